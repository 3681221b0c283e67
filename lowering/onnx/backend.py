"""The ONNX backend as the core sees it (:mod:`ptqc.backends`, entry point ``onnx``): the
``ptqc diff PATH:onnx`` / ``PATH:onnx-int`` targets, ``ptqc eval --target onnx|onnx-int`` and
``ptqc export --format onnx``."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ptqc.backends import Backend
from ptqc.diff_targets import Target
from ptqc.errors import PtqcError
from ptqc.lowering.onnx import export, perplexity_of, run, session

MODES = {"onnx": "fake", "onnx-int": "integer"}  # target -> export mode


class OnnxTarget(Target):
    """The graph exported to ONNX (``mode``), run by an onnxruntime reference session."""

    target = "onnx"
    mode = "fake"

    def prepare(self, names):
        self.tmp = Path(tempfile.mkdtemp(prefix="ptqc-diff-onnx-"))
        self.export = export(self.qm, self.tmp / "model.onnx", self.mode, outputs=[n for n in names if n != "logits"])
        self.sess = session(self.export.path, reference=True)

    def run(self, batch, names):
        return {k: torch.from_numpy(v).float() for k, v in run(self.sess, batch, names).items()}

    def close(self):
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class OnnxIntegerTarget(OnnxTarget):
    target = "onnx-int"
    mode = "integer"


def model_path(out: Path) -> Path:
    """``-o``: a ``.onnx`` file, else a directory getting ``model.onnx``."""
    return out if out.suffix == ".onnx" else out / "model.onnx"


class OnnxBackend(Backend):
    name = "onnx"
    title = "ONNX"
    targets = {"onnx": OnnxTarget, "onnx-int": OnnxIntegerTarget}
    eval_targets = ("onnx", "onnx-int")
    formats = ("onnx",)

    def perplexity(self, qm, ids, seqlen, *, target, batch_size, max_windows, device, progress, log):
        return perplexity_of(qm, ids, seqlen, mode=MODES[target], batch_size=batch_size, max_windows=max_windows,
                             progress=progress)

    def check_output(self, out, fmt, force):
        target = model_path(out)
        if target.parent.exists() and not target.parent.is_dir():
            raise PtqcError(f"{target.parent} exists and is not a directory")
        if target.exists() and not force:
            raise PtqcError(f"{target} already exists; pass --force to overwrite it")

    def export(self, qm, out, fmt, *, force, mode="fake", outputs=(), external_data=None, int4=True,
               int_kernel="s8s8"):
        res = export(qm, model_path(out), mode, outputs=list(outputs), external_data=external_data, int4=int4,
                     int_kernel=int_kernel)
        return res.summary(), (f"{res.path}" + (f" + {res.data_path.name}" if res.data_path else "") +
                               f" ({fmt}, mode {mode}, {res.nodes} nodes, {res.weight_bytes / 2**20:.1f} MiB of "
                               f"weights, {len(res.integer_linears)} MatMulInteger / {len(res.nbits_linears)} "
                               "MatMulNBits linears)")


BACKEND = OnnxBackend()
