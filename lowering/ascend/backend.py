"""The Ascend backend as the core sees it (:mod:`ptqc.backends`, entry point ``ascend``): the
``ptqc diff PATH:ascend`` target, the probes of a lowered graph, ``ptqc eval --target ascend``,
``ptqc export --format ascend`` / ``check-export`` and ``ptqc inspect --ops``.

Probes of a lowered graph (:func:`lowered_probes`): a linear is its matmul kernel (or the float
bias add after it; the merged ``gate_up_proj`` is probed as its two halves), ``layers.<i>`` the
residual sum output of the fused norm kernel after layer i.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx

from ptqc import ops
from ptqc.backends import Backend, check_written
from ptqc.calib import split
from ptqc.diff_targets import TorchTarget, cast_parameters
from ptqc.errors import PtqcError
from ptqc.ir import info
from ptqc.lowering.ascend import export as exporter
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import is_lowered, kernel_report, lower
from ptqc.probes import Probe, chunk_name, layer_output, logits_node

SUM_INDEX = {npu.ADD_RMS_NORM: 2, npu.ADD_RMS_NORM_QUANT: 1, npu.ADD_RMS_NORM_DYNAMIC_QUANT: 1}  # x1 + x2 output
MATMULS = (npu.QUANT_MATMUL, npu.WEIGHT_QUANT_BATCHMATMUL, ops.LINEAR)


def _layer_outputs(g: fx.Graph) -> dict[int, str]:
    """Decoder layer -> the node of its output: the residual sum of the fused norm after it (a
    ``getitem`` added if missing), else (``fuse=false``) the layer's own residual add."""
    segs = split(g)
    rank = {s.key: r for r, s in enumerate(segs)}
    seg_of = {n.name: s.key for s in segs for n in s.nodes}
    out: dict[int, str] = {}
    for seg in (s for s in segs if s.layer is not None):
        own = {n.name for n in seg.nodes}
        fused = next((n for n in g.nodes if n.op == "call_function" and n.target in SUM_INDEX
                      and rank.get(seg_of.get(n.name), -1) > rank[seg.key]
                      and any(isinstance(a, fx.Node) and a.name in own for a in n.args[:2])), None)
        if fused is None:
            out[seg.layer] = layer_output(seg)
            continue
        idx = SUM_INDEX[fused.target]
        s = next((u for u in fused.users if u.target is operator.getitem and u.args[1] == idx), None)
        if s is None:
            with g.inserting_after(fused):
                s = g.call_function(operator.getitem, (fused, idx))
            m = info(fused)
            info(s).update({"module": m.get("module"), "layer": m.get("layer"), "role": "residual"})
        out[seg.layer] = s.name
    return out


def _linear_probes(g: fx.Graph, order: dict) -> list[Probe]:
    """The probes of the matmul kernels (and linears left as fake-quant ops), keyed by module path."""
    logits = logits_node(g)
    probes: list[Probe] = []
    seen: dict[str, int] = {}

    def add(key, role, layer, node, at):
        j = seen.get(key, 0)
        seen[key] = j + 1
        probes.append(Probe(key if j == 0 else f"{key}#{j}", "linear", layer, node, role, at))

    for n in g.nodes:
        if n.op != "call_function" or n.target not in MATMULS or n is logits:
            continue
        m = info(n)
        mod, layer = m.get("module") or n.name, m.get("layer")
        users = list(n.users)
        y = n
        if len(users) == 1 and users[0].target == torch.ops.aten.add.Tensor and info(users[0]).get("module") == mod:
            y = users[0]  # static path, int_bias=false: the float bias added after dequantization
        if y is logits:
            continue
        if m.get("role") == "gate_up" and any(u.target == npu.SWIGLU_QUANT for u in users):  # fused here
            base = mod.removesuffix(".gate_up_proj")
            add(f"{base}.gate_proj", "gate", layer, chunk_name(y.name, 0, 2), order[n.name])
            add(f"{base}.up_proj", "up", layer, chunk_name(y.name, 1, 2), order[n.name])
        else:
            add(mod, m.get("role"), layer, y.name, order[n.name])
    return probes


def lowered_probes(qm) -> list[Probe]:
    """The probes of a graph lowered to Ascend kernels (see the module doc), in graph order.

    May add a ``getitem`` node (the residual output of the final fused norm) to ``qm.graph``."""
    g = qm.graph
    layer_out = _layer_outputs(g)  # first: it may add getitem nodes
    order = {n.name: i for i, n in enumerate(g.nodes)}
    probes = [Probe("embed", "embed", None, n.name, "embed", order[n.name]) for n in g.nodes
              if n.op == "call_function" and info(n).get("role") == "embed" and n.target not in MATMULS][:1]
    probes += _linear_probes(g, order)
    probes += [Probe(f"layers.{i}", "layer", i, name, None, order[name]) for i, name in layer_out.items()]
    probes.append(Probe("logits", "logits", None, "logits", None, len(order)))
    return sorted(probes, key=lambda p: p.order)


class AscendTarget(TorchTarget):
    """The graph lowered to Ascend kernels in memory (``ptqc_npu`` ops), run by torch: the CPU
    emulation, or torch_npu kernels with ``device=npu``. Options: the ``ascend`` pass's (fuse,
    truncate, int_bias, fallback...: every keyword of :func:`ptqc.lowering.ascend.lower.lower`;
    ``fallback`` defaults to true here) and ``device``."""

    target = "ascend"

    @classmethod
    def option_types(cls):
        out = {}
        for k, p in list(inspect.signature(lower).parameters.items())[1:]:
            d = p.default
            out[k] = type(d) if isinstance(d, (bool, int, float, str)) else str
        return {**out, "device": str, "dtype": str}

    def __init__(self, path, qm, spec, options=None):
        super().__init__(path, qm, spec, options)
        from ptqc import device as devices

        dev = devices.resolve(self.options.get("device", "cpu"))  # one-line error without torch_npu
        self.device = None if dev == "cpu" else dev
        lowering = {k: v for k, v in self.options.items() if k not in ("device", "dtype")}
        dtype = self.options.get("dtype")
        self.lowering = None
        if is_lowered(qm):
            given = [*lowering] + (["dtype"] if dtype and getattr(torch, dtype, None) != qm.dtype else [])
            if given:
                raise PtqcError(f"{path} is already lowered for Ascend (compiled with the ascend pass); drop "
                                f"{', '.join(given)} from {spec!r}")
        else:
            if dtype:
                cast_parameters(qm, dtype)
            self.lowering = lower(qm, **{"fallback": True, **lowering})  # in memory; the artifact is unchanged
        self._probes = lowered_probes(qm)

    def probes(self):
        return self._probes

    def info(self):
        out = super().info()
        if self.lowering is not None:
            out["refused"] = list(self.lowering["refused"])
        return out

    def describe(self):
        return f"{self.path} (ascend, {'emulated on cpu' if self.device is None else self.device})"


class AscendBackend(Backend):
    name = "ascend"
    title = "Ascend"
    op_namespace = "ptqc_npu"
    targets = {"ascend": AscendTarget}
    eval_targets = ("ascend",)
    formats = ("ascend",)
    export_missing = f"{exporter.DESCRIPTION} (Ascend) is missing"

    def probes(self, qm):
        return lowered_probes(qm)

    def perplexity(self, qm, ids, seqlen, *, target, batch_size, max_windows, device, progress, log):
        """The Ascend lowering of an in-memory copy of the artifact's graph (the artifact is not
        changed). What the kernels cannot take (e.g. a dynamic per-token KV cache in a prompt)
        stays a float op, said through ``log``."""
        from ptqc import evaluate

        if not is_lowered(qm):
            for why in lower(qm, fallback=True, seqlen=seqlen)["refused"]:
                log(f"ascend: kept as a float op: {why}")
        return evaluate.perplexity(qm, ids, seqlen, batch_size=batch_size, device=device, max_windows=max_windows,
                                   progress=progress)

    def export(self, qm, out, fmt, *, force, dtype=None, **options):
        res = exporter.export(qm, out, force=force, dtype=dtype)
        check_written(self, out)
        return res, (f"{out} ({fmt}, {res['model_quant_type']}, {res['metadata']['dtype']}, {res['tensors']} tensors, "
                     "checked)")

    def is_export(self, path):
        return (path / exporter.DESCRIPTION).is_file()

    def check(self, path, trust_remote_code=False):
        return exporter.check(path)  # reads config.json as JSON: no model is built

    def load(self, path, dtype, trust_remote_code=False):
        return exporter.load(path, dtype, trust_remote_code)

    def kernel_report(self, qm):
        return kernel_report(qm)


BACKEND = AscendBackend()
