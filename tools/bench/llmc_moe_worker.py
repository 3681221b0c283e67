#!/usr/bin/env python
"""llm-compressor GPTQ on a Qwen3-MoE model, run inside the llm-compressor venv (not ptqc's).

Called by tools/bench/moe.py, one child process per configuration:

    /tmp/llmc-venv/bin/python tools/bench/llmc_moe_worker.py '{"model": ..., "method": "gptq", "bits": 4,
        "group": 128, "all_experts": true, "calib": calib.pt, "eval": eval.pt, "threads": 1, "save": DIR}'

* The model is loaded in float32 and linearized by llm-compressor's ``linearize_moe`` (its MoE
  support: the fused 3-D experts become one ``nn.Linear`` per expert projection,
  ``LinearExperts2D``, whose forward honours ``moe_calibrate_all_experts``);
  ``oneshot`` runs GPTQModifier (targets Linear, ignore ``lm_head`` and the routers ``mlp.gate``,
  integer asymmetric weights, group ``group``; its defaults otherwise: block_size 128,
  dampening_frac 0.01, actorder static, sequential pipeline) with
  ``moe_calibrate_all_experts=all_experts`` (True: every expert runs on every token for its
  statistics, the output keeps the real routing; False: routed tokens only).
* Checks (tools/bench/llmc_worker.py): every targeted Linear has a scale and zero point, lies on
  its grid and changed; ``experts_quantized`` counts the expert projections among them.
* PPL: plain transformers forward over the ``eval`` windows (``method`` ``fp``: the float model).
* ``save``: the fake-quantized (on-grid float32) weights written as a plain float checkpoint under
  the source checkpoint's own tensor names (per expert), config and tokenizer copied, so ptqc's
  evaluator reads it like any model.

Prints one line ``RESULT {json}`` (``error`` holds a one-line error when the method fails).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from llmc_worker import check_quantized, perplexity, scheme, vm_hwm


def load(model: str):
    import torch
    from transformers import AutoModelForCausalLM

    from llmcompressor.modeling.moe.linearize import linearize_moe

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    linearize_moe(m)  # (load_quantizable_moe's loader patch imports every model, torchvision included)
    return m


def quantize(model, spec: dict, calib) -> float:
    """GPTQ with llm-compressor's oneshot; returns its wall time."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    rec = GPTQModifier(config_groups=scheme(spec["bits"], spec["group"]), ignore=["lm_head", "re:.*mlp.gate$"])
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=spec["model"], dataset=ds, recipe=rec, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], batch_size=int(spec.get("calib_batch_size", 1)),
            moe_calibrate_all_experts=bool(spec.get("all_experts", True)), output_dir=None, log_dir=None)
    return time.perf_counter() - t0


def save_float(model, src: str, out: str) -> int:
    """Write the model's weights under the source checkpoint's tensor names (float32) to ``out``;
    returns how many tensors. Every source tensor must have its counterpart."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_p, out_p = Path(src), Path(out)
    keys = set()
    for f in src_p.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    state = model.state_dict()
    missing = sorted(k for k in keys if k not in state)
    if missing:
        raise RuntimeError(f"{len(missing)} checkpoint tensors have no counterpart in the model, e.g. {missing[0]}")
    if out_p.exists():
        shutil.rmtree(out_p)
    out_p.mkdir(parents=True)
    save_file({k: state[k].detach().float().contiguous() for k in sorted(keys)}, str(out_p / "model.safetensors"))
    for f in src_p.iterdir():
        if f.suffix in (".json", ".txt") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out_p / f.name)
    return len(keys)


def run(spec: dict, res: dict) -> None:
    import torch

    from llmc_worker import materialize

    calib = torch.load(spec["calib"], weights_only=True).long()
    evalw = torch.load(spec["eval"], weights_only=True).long()
    bs = int(spec.get("batch_size", 8))
    t0 = time.perf_counter()
    model = load(spec["model"])
    res["load_s"] = time.perf_counter() - t0
    if spec["method"] != "fp":
        fp_state = {k: v.clone() for k, v in model.state_dict().items()}
        res["quant_s"] = quantize(model, spec, calib)
        res["vmhwm_quant"] = vm_hwm()
        res["materialized"] = materialize(model)
        res["check"] = check_quantized(model, fp_state, spec["bits"])
        del fp_state
        res["experts_quantized"] = sum(1 for n, m in model.named_modules()
                                       if ".experts." in n and hasattr(m, "weight_scale"))
    res["ppl"] = perplexity(model, evalw, bs)
    if spec.get("save"):
        res["saved_tensors"] = save_float(model, spec["model"], spec["save"])
        res["saved"] = spec["save"]


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    res: dict = {"method": spec["method"], "all_experts": spec.get("all_experts")}
    try:
        import llmcompressor

        res["llmcompressor"] = getattr(llmcompressor, "__version__", "?")
        run(spec, res)
    except Exception as e:  # noqa: BLE001 - a failing method is a table cell, not a crash
        res["error"] = f"{type(e).__name__}: {' '.join(str(e).split()) or type(e).__name__}"[:300]
        res["traceback"] = traceback.format_exc()[-3000:]
    res["vmhwm_exit"] = vm_hwm()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
