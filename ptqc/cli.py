"""The ``ptqc`` command line.

    ptqc compile --passes rtn:bits=4 MODEL [-o OUT]  trace, run passes, write an artifact
    ptqc inspect OUT                                the transformed graph
    ptqc passes [NAME]                              available passes and their options
    ptqc eval OUT                                   perplexity (--generate, --tasks t1,t2 with lm-eval)
    ptqc generate OUT                               greedy continuations and collapse signals
    ptqc diagnose MODEL OUT -o DIR                  per-layer / per-linear error vs the float model
    ptqc diff A B                                   two models or backends compared probe by probe
    ptqc export OUT -o FILE|DIR                     ONNX, Ascend or compressed-tensors (check-export DIR)
    ptqc study STUDY.yaml -o DIR                    models x pipelines x seeds, cached (--jobs N, --ray, --compare A B)

The commands live in ``ptqc/cli_*.py``; they parse options and call the library. Errors a user
can cause print one line (``error: ...``) and exit with status 2.
"""
from __future__ import annotations

import click

from ptqc import cli_compare, cli_compile, cli_eval, cli_export, cli_inspect, cli_study


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptqc")
def main():
    """ptqc: post-training quantization compiler for LLMs (Ascend and ONNX backends)."""


for _cmd in (cli_compile.compile, cli_compare.diagnose, cli_compare.diff_cmd, cli_eval.eval_cmd,
             cli_eval.generate_cmd, cli_export.export_cmd, cli_export.check_export_cmd, cli_inspect.inspect_cmd,
             cli_inspect.passes_cmd, cli_inspect.recipes_cmd, cli_study.study_cmd):
    main.add_command(_cmd)


if __name__ == "__main__":
    main()
