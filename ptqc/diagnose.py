"""Where does a quantized model lose accuracy? Layer-by-layer comparison against its float model.

:func:`compare` runs two :class:`~ptqc.calib.LayerRunner` s (float and quantized) in lockstep
over the same calibration windows, one decoder layer and one batch at a time, and measures
every decoder layer's output (the residual stream the next layer reads), every linear in it
(matched by module path, ``meta["ptqc"]["module"]``) and the logits, in two **modes**:

``local``
    the quantized layer on the *float* model's inputs to it: the error this layer adds by
    itself (including its earlier quantized linears: gate/up see the quantized attention).
    Runs on a copy of the float runner's state, keyed by node names; a pass that renamed the
    residual stream makes :func:`compare` raise naming the missing values.
``accumulated``
    the quantized layer on the quantized model's own inputs: everything upstream included.

Metrics are running sums (:mod:`ptqc.diagnose_metrics`); the sensitive layers and linears come
from :mod:`ptqc.diagnose_sensitivity`, the files from :mod:`ptqc.diagnose_report`. Memory: one
decoder layer of weights per model, both models' calibration activations, and for the batch
being run the float outputs of the layer's linears (or its float logits: batch x seqlen x vocab).
"""
from __future__ import annotations

import time

import torch

from ptqc.calib import LayerRunner, Segment, calibration_batches
from ptqc.diagnose_metrics import METRICS, MODES, Acc, metrics_from_sums
from ptqc.diagnose_report import format_table, write_report
from ptqc.diagnose_sensitivity import add_sensitivity, outliers
from ptqc.errors import PtqcError
from ptqc.ir import QModel
from ptqc.probes import layer_output, linears

FORMAT = "ptqc-diagnostics"
VERSION = 1


def _missing(rf: LayerRunner, seg: Segment) -> list[str]:
    """Names a segment reads from the runner state (computed in earlier segments) that the float
    runner's state does not have."""
    own = {n.name for n in seg.nodes}
    reads = {a.name for n in seg.nodes for a in n.all_input_nodes
             if a.op != "get_attr" and a.name not in own and a.name not in seg.consts}
    return sorted(reads - set(rf.state[0]))


def _preload(qm: QModel, seg: Segment, device) -> dict:
    """The segment's weights, read once for all batches (passed to run() as overrides)."""
    return {w: (qm.store[w].to(device) if device is not None else qm.store[w]) for w in seg.weights}


def _run_local(rq: LayerRunner, key: str, b: int, fin: dict, **kw) -> None:
    """Run segment ``key`` of the quantized model on batch b's float state ``fin`` (not committed)."""
    saved = rq.state[b]
    rq.state[b] = fin
    try:
        rq.run(key, commit=False, batches=[b], **kw)
    finally:
        rq.state[b] = saved


class _Layer:
    """Layer i of both models: the float values of the batch being run, and the metric sums of
    its output and matched linears in each mode."""

    def __init__(self, i: int, fseg: Segment, qseg: Segment, rot):
        self.i, self.rot = i, rot
        self.flin, self.qlin = linears(fseg), linears(qseg)
        fkeys = {kk for kk, _ in self.flin.values()}
        self.qkeys = {kk: role for kk, role in self.qlin.values()}
        self.fp_only, self.q_only = sorted(fkeys - set(self.qkeys)), sorted(set(self.qkeys) - fkeys)
        self.matched = [kk for kk, _ in self.qlin.values() if kk in fkeys]
        self.fout, self.qout = layer_output(fseg), layer_output(qseg)
        self.acc = {mode: {"output": Acc(), **{kk: Acc() for kk in self.matched}} for mode in MODES}
        self.cur: dict[str, torch.Tensor] = {}

    def fhook(self, n, args, y, b):
        if n.name in self.flin:
            self.cur[self.flin[n.name][0]] = y
        elif n.name == self.fout:
            self.cur["output"] = y

    def qhook(self, mode: str):
        a, rot, i = self.acc[mode], self.rot, self.i

        def hook(n, args, y, b):
            if n.name in self.qlin:
                kk = self.qlin[n.name][0]
                if kk in self.cur and kk in a:
                    y = y if rot is None else rot.to_float("linear", self.qlin[n.name][1], y)
                    a[kk].update(self.cur[kk], y, f"layer {i} {kk}")
            elif n.name == self.qout:
                y = y if rot is None else rot.to_float("layer", None, y)
                a["output"].update(self.cur["output"], y, f"layer {i} output")
        return hook

    def record(self) -> dict:
        return {"layer": self.i, "output": {mode: self.acc[mode]["output"].metrics() for mode in MODES},
                "linears": {kk: {"role": self.qkeys[kk], **{mode: self.acc[mode][kk].metrics() for mode in MODES}}
                            for kk in self.matched}}


def _compare_layer(rf, rq, fp: QModel, q: QModel, fseg: Segment, qseg: Segment, i: int, dev, rot) -> _Layer:
    missing = _missing(rf, qseg)
    if missing:
        raise PtqcError(f"local mode: layer {i} of the quantized model reads {', '.join(missing)}, "
                        "which the float model's state does not have (a pass renamed the residual stream "
                        "or the layer inputs?)")
    lay = _Layer(i, fseg, qseg, rot)
    key = f"layer.{i}"
    fw, qw = _preload(fp, fseg, dev), _preload(q, qseg, dev)
    local, accumulated = lay.qhook("local"), lay.qhook("accumulated")
    for b in range(len(rf.state)):
        fin = dict(rf.state[b])  # the float inputs of this layer (values are never modified in place)
        if rot is not None:  # the residual stream (hidden-sized floats) into the rotated basis
            fin = {kk: rot.to_rotated(v) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   and v.dim() and v.shape[-1] == rot.hidden else v for kk, v in fin.items()}
        rf.run(key, batches=[b], hook=lay.fhook, overrides=fw)
        _run_local(rq, key, b, fin, hook=local, overrides=qw)
        rq.run(key, batches=[b], hook=accumulated, overrides=qw)
        lay.cur.clear()
    del fw, qw
    fp.store.release(fseg.weights)
    q.store.release(qseg.weights)
    return lay


def _compare_suffix(rf, rq, fseg, qseg, fp, q, dev) -> dict:
    missing = _missing(rf, qseg)
    if missing:
        raise PtqcError(f"local mode: the quantized model's final segment reads {', '.join(missing)}, "
                        "which the float model's state does not have")
    acc = {mode: Acc() for mode in MODES}
    fw, qw = _preload(fp, fseg, dev), _preload(q, qseg, dev)
    cur = {}
    for b in range(len(rf.state)):
        fin = dict(rf.state[b])
        rf.run("suffix", batches=[b], overrides=fw, on_output=lambda _b, y: cur.__setitem__("y", y))
        _run_local(rq, "suffix", b, fin, overrides=qw,
                   on_output=lambda _b, y: acc["local"].update(cur["y"], y, "logits"))
        rq.run("suffix", batches=[b], overrides=qw,
               on_output=lambda _b, y: acc["accumulated"].update(cur["y"], y, "logits"))
        cur.clear()
    fp.store.release(fseg.weights)
    q.store.release(qseg.weights)
    return {mode: acc[mode].metrics() for mode in MODES}


@torch.no_grad()
def compare(fp: QModel, q: QModel, ids: torch.Tensor, batch_size: int = 8, device=None, progress=None, *,
            k: float = 3.0, metric: str = "rel_error", top: int = 5) -> dict:
    """Compare ``q`` against its float model ``fp`` on token windows ``ids`` [n, seqlen].

    Returns the report dict (JSON-ready; the schema is in the module doc and :func:`write_report`).
    ``progress(iterable, desc=..., unit=...)`` wraps the layer loop (e.g. a tqdm factory)."""
    from ptqc.basis import Rotation

    if metric not in METRICS:
        raise PtqcError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    t0 = time.perf_counter()
    ids = ids if ids.ndim == 2 else ids[None]
    batches = calibration_batches(ids, batch_size)
    dev = torch.device(device) if device is not None and str(device) != "cpu" else None
    rf = LayerRunner(fp, batches, device=dev, check_finite=False)
    rq = LayerRunner(q, batches, device=dev, check_finite=False)
    fsegs, qsegs = rf.freeze(), rq.freeze()  # the graphs do not change during compare
    nf, nq = len(fsegs) - 2, len(qsegs) - 2
    if nf != nq:
        raise PtqcError(f"the float model has {nf} decoder layers and the quantized model {nq}; "
                        "compare a quantized model with the float model it was compiled from")
    rf.run("prefix")
    rq.run("prefix")
    rot = Rotation.of(q)  # a rotated model: its values back to the float basis, float inputs into its basis
    done = [_compare_layer(rf, rq, fp, q, fsegs[f"layer.{i}"], qsegs[f"layer.{i}"], i, dev, rot)
            for i in (range(nf) if progress is None else progress(range(nf), desc="diagnose", unit="layer"))]
    logits = _compare_suffix(rf, rq, fsegs["suffix"], qsegs["suffix"], fp, q, dev)
    report = {
        "format": FORMAT, "version": VERSION,
        "fp_model": str(fp.source), "quantized_model": str(q.source),
        "samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "tokens": int(ids.numel()),
        "batch_size": batch_size, "num_layers": nf,
        "layers": [lay.record() for lay in done], "logits": logits,
        "unmatched_linears": {"fp_only": [m for lay in done for m in lay.fp_only],
                              "quantized_only": [m for lay in done for m in lay.q_only]},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return add_sensitivity(report, k=k, metric=metric, top=top)


__all__ = ["compare", "add_sensitivity", "outliers", "write_report", "format_table", "metrics_from_sums",
           "METRICS", "MODES"]
