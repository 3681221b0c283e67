"""Running an exported model with onnxruntime (CPU): :func:`session` (``reference=True``: no graph
optimization changes the arithmetic, for ``ptqc diff`` and tests; ``False``: all, for speed) and
:func:`perplexity`, :func:`ptqc.evaluate.perplexity` with the logits from onnxruntime."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ptqc.errors import CollapseError, PtqcError


def session(path, reference: bool = True, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if reference
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(Path(path)), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
        raise PtqcError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None


def run(sess, ids: torch.Tensor, outputs=None) -> dict[str, np.ndarray]:
    """Run on int64 token ids [batch, seq]; returns {output name: array} (all outputs by default)."""
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    ids = ids if ids.ndim == 2 else ids[None]
    vals = sess.run(names, {"input_ids": ids.to(torch.int64).numpy()})
    return dict(zip(names, vals))


def logits(sess, ids: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(run(sess, ids, ["logits"])["logits"])


@torch.no_grad()
def perplexity(sess, ids: torch.Tensor, seqlen: int, *, batch_size: int = 8, max_windows: int | None = None,
               progress=None) -> dict:
    """PPL through onnxruntime, same protocol and result keys as :func:`ptqc.evaluate.perplexity`."""
    from ptqc.evaluate import windows

    w = windows(ids, seqlen)
    if max_windows:
        w = w[:max_windows]
    nll, count = 0.0, 0
    batches = list(torch.split(w, batch_size))
    it = progress(batches, desc="ppl (onnx)", unit="batch") if progress else batches
    for t in it:
        lg = logits(sess, t).float()
        if not torch.isfinite(lg).all():
            raise CollapseError("collapse: non-finite logits from onnxruntime")
        nll += F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), t[:, 1:].reshape(-1), reduction="sum").item()
        count += t[:, 1:].numel()
    mean = nll / count
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "windows": int(w.shape[0]),
            "seqlen": seqlen, "tokens": count, "layers": None}


def perplexity_of(qm, ids: torch.Tensor, seqlen: int, *, mode: str = "fake", batch_size: int = 8,
                  max_windows: int | None = None, progress=None, reference: bool = False) -> dict:
    """Export ``qm`` (``mode``) to a temporary directory and compute its PPL with onnxruntime
    (optimized session unless ``reference``): ``ptqc eval --target onnx``."""
    import shutil
    import tempfile

    from ptqc.lowering.onnx.export import export

    tmp = Path(tempfile.mkdtemp(prefix="ptqc-onnx-"))
    try:
        res = export(qm, tmp / "model.onnx", mode)
        r = perplexity(session(res.path, reference=reference), ids, seqlen, batch_size=batch_size,
                       max_windows=max_windows, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r.update({"target": "onnx" if mode == "fake" else f"onnx-{mode}", "onnx_mode": mode})
    return r
