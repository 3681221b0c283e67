"""``ptqc diff A B``: run two backends on the same tokens and compare every intermediate they share.

Specs (``PATH[:TARGET]``; a suffix that is not a registered target name is part of the path):

    model/            a Hugging Face model directory: the float graph, run by torch  (target ``torch``)
    out/              a ptqc artifact: its (fake-quant) graph, run by torch          (target ``torch``)
    out/:onnx         the artifact exported to ONNX (``mode="fake"``), run by onnxruntime with every
                      graph optimization disabled (the reference session)
    out/:onnx-int     the same with ``mode="integer"`` (MatMulInteger / MatMulNBits kernels)
    out/:ascend       the artifact lowered in memory to Ascend kernels (``ptqc_npu`` ops,
                      :mod:`ptqc.lowering.ascend.lower`), run by torch: the documented CPU
                      emulation, or torch_npu with ``device=npu``. Options follow the target,
                      comma-separated: ``out/:ascend,fuse=false,truncate=false,int_bias=false,
                      fallback=false,device=npu:0,dtype=float16`` (defaults: the ``ascend``
                      pass's, except ``fallback=true`` so a partly lowerable graph still diffs;
                      ``device=cpu``; ``dtype``: the artifact's, else its float parameters
                      ``*.weight``/``*.bias`` are cast, quantization scales stay float32).
                      An artifact compiled with the ``ascend`` pass is run as it is.

Targets are a registry (:data:`TARGETS`, :func:`register_target`): a backend registers a class
with ``run(batch, names) -> {name: tensor}`` and is usable as ``out/:<name>`` at once; a class
that declares ``OPTIONS`` ({name: type}; or overrides ``option_types()``) accepts
``out/:<name>,key=value,...``.

What is compared (*probes*, taken from each side's ptqc graph and matched by key):

* ``embed``           the embedding output;
* ``<module path>``   every linear, keyed by its module path (``model.layers.3.mlp.down_proj``;
                      ``#j`` appended when a module runs several times), as in ``ptqc diagnose``;
* ``layers.<i>``      the output of decoder layer i (the residual stream it leaves,
                      :func:`ptqc.diagnose._layer_output`);
* ``logits``.

A side compiled with ``rotate`` computes the embedding, layer outputs and o_proj/down_proj (and,
with ``v``, v_proj) outputs in a rotated basis; its values are mapped back to the float basis
(:mod:`ptqc.basis`) before comparing, and the report lists it under ``unrotated``.

ONNX targets expose the probes as extra graph outputs by FX node name (the lowering keeps the
names).

In a graph lowered to Ascend kernels (:func:`lowered_probes`) the probes are found on the kernels:
a linear is the ``quant_matmul`` / ``weight_quant_batchmatmul`` node carrying its module path
(the float add after it when the static path keeps a float bias; a linear left as a fake-quant
op by ``fallback`` is itself); the merged ``mlp.gate_up_proj`` matmul is split along its last
dimension into its halves, probed as ``mlp.gate_proj`` (first) and ``mlp.up_proj`` (second);
``layers.<i>`` is the ``x1 + x2`` output of the fused ``add_rms_norm*`` kernel that adds layer
i's last residual branch (it runs in layer i+1's input norm, or the final norm), a ``getitem``
for it being added to the in-memory graph when the lowering dropped it as unused. Probes found
on one side only are listed in ``unmatched``, never an error.

Depth order is the order of A's graph. With ``x`` the values of A (the reference) and ``y``
those of B, summed over every element of every window:

* ``max_abs``  = max |y - x|
* ``max_rel``  = max |y - x| / max(|x|, 1e-6 * max|x|)  (element-wise; the floor only avoids 0/0)
* ``sqnr_db``  = 10 log10(sum x^2 / sum (x - y)^2)      (``null`` + ``exact: true`` when y == x)
* ``cosine``   = sum x y / sqrt(sum x^2 sum y^2)

``first_below`` is the first probe in depth order whose SQNR is under the threshold. Two
models whose configs (architecture, sizes, vocabulary) or tokenizers differ are refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ptqc.errors import PtqcError

FORMAT = "ptqc-diff"
VERSION = 1
CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings")


@dataclass
class Probe:
    key: str
    kind: str  # embed | linear | layer | logits
    layer: int | None
    node: str  # FX node name ("logits": the graph output)
    role: str | None
    order: int


def is_lowered(qm) -> bool:
    """Has the graph been lowered to Ascend kernels (``ptqc_npu`` ops)?"""
    return any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function")


def graph_probes(qm) -> list[Probe]:
    """The comparable points of a ptqc graph, in graph order."""
    if is_lowered(qm):
        return lowered_probes(qm)
    from ptqc import ops
    from ptqc.calib import split
    from ptqc.diagnose import _layer_output, _linears

    order = {n.name: i for i, n in enumerate(qm.graph.nodes)}
    out_node = next(n for n in qm.graph.nodes if n.op == "output")
    logits = out_node.args[0] if not isinstance(out_node.args[0], (tuple, list)) else out_node.args[0][0]
    probes = []
    for n in qm.graph.nodes:
        if n.op == "call_function" and n.meta.get("ptqc", {}).get("role") == "embed" and n.target != ops.LINEAR:
            probes.append(Probe("embed", "embed", None, n.name, "embed", order[n.name]))
            break
    for seg in split(qm.graph):
        for name, (key, role) in _linears(seg).items():
            if name != logits.name:
                probes.append(Probe(key, "linear", seg.layer, name, role, order[name]))
        if seg.layer is not None:
            out = _layer_output(seg)
            probes.append(Probe(f"layers.{seg.layer}", "layer", seg.layer, out, None, order[out]))
    probes.append(Probe("logits", "logits", None, "logits", None, len(order)))
    return sorted(probes, key=lambda p: p.order)


def chunk_name(node: str, i: int, k: int) -> str:
    """The name of a probe on chunk i of k (last dimension) of a node's output."""
    return f"{node}#{i}/{k}"


def _wanted(names) -> dict[str, list[tuple[str, int, int]]]:
    """node name -> [(probe name, chunk i, of k)] (k = 1: the whole value)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for nm in names:
        base, sep, ch = nm.partition("#")
        i, k = (int(v) for v in ch.split("/")) if sep else (0, 1)
        out.setdefault(base, []).append((nm, i, k))
    return out


def _capture(want: dict, got: dict, name: str, y) -> None:
    for probe, i, k in want.get(name, ()):
        v = y if k == 1 else y.chunk(k, -1)[i]
        got[probe] = v.detach().float().cpu()


def lowered_probes(qm) -> list[Probe]:
    """The probes of a graph lowered to Ascend kernels (see the module doc), in graph order.

    May add a ``getitem`` node (the residual output of the final fused norm) to ``qm.graph``."""
    import operator

    import torch.fx as fx

    from ptqc import ops
    from ptqc.calib import split
    from ptqc.diagnose import _layer_output
    from ptqc.ir import info
    from ptqc.lowering.ascend import ops as npu

    g = qm.graph
    sum_index = {npu.ADD_RMS_NORM: 2, npu.ADD_RMS_NORM_QUANT: 1, npu.ADD_RMS_NORM_DYNAMIC_QUANT: 1}
    matmuls = (npu.QUANT_MATMUL, npu.WEIGHT_QUANT_BATCHMATMUL, ops.LINEAR)
    out_node = next(n for n in g.nodes if n.op == "output")
    logits = out_node.args[0] if not isinstance(out_node.args[0], (tuple, list)) else out_node.args[0][0]
    # layer outputs first: they may add getitem nodes
    segs = split(g)
    rank = {s.key: r for r, s in enumerate(segs)}
    seg_of = {n.name: s.key for s in segs for n in s.nodes}
    layer_out: dict[int, str] = {}
    for seg in segs:
        if seg.layer is None:
            continue
        own = {n.name for n in seg.nodes}
        fused = next((n for n in g.nodes if n.op == "call_function" and n.target in sum_index
                      and rank.get(seg_of.get(n.name), -1) > rank[seg.key]
                      and any(isinstance(a, fx.Node) and a.name in own for a in n.args[:2])), None)
        if fused is None:  # not fused (fuse=false): the residual add is still in the layer
            layer_out[seg.layer] = _layer_output(seg)
            continue
        idx = sum_index[fused.target]
        s = next((u for u in fused.users if u.target is operator.getitem and u.args[1] == idx), None)
        if s is None:
            with g.inserting_after(fused):
                s = g.call_function(operator.getitem, (fused, idx))
            m = info(fused)
            info(s).update({"module": m.get("module"), "layer": m.get("layer"), "role": "residual"})
        layer_out[seg.layer] = s.name
    order = {n.name: i for i, n in enumerate(g.nodes)}
    probes: list[Probe] = []
    for n in g.nodes:
        if n.op == "call_function" and info(n).get("role") == "embed" and n.target not in matmuls:
            probes.append(Probe("embed", "embed", None, n.name, "embed", order[n.name]))
            break
    seen: dict[str, int] = {}

    def add(key, role, layer, node, at):
        j = seen.get(key, 0)
        seen[key] = j + 1
        probes.append(Probe(key if j == 0 else f"{key}#{j}", "linear", layer, node, role, at))

    for n in g.nodes:
        if n.op != "call_function" or n.target not in matmuls or n is logits:
            continue
        m = info(n)
        mod, layer = m.get("module") or n.name, m.get("layer")
        users = list(n.users)
        y = n
        if len(users) == 1 and users[0].target == torch.ops.aten.add.Tensor and info(users[0]).get("module") == mod:
            y = users[0]  # static path, int_bias=false: the float bias added after dequantization
        if y is logits:
            continue
        if m.get("role") == "gate_up" and mod.endswith(".gate_up_proj"):
            base = mod.removesuffix(".gate_up_proj")
            add(f"{base}.gate_proj", "gate", layer, chunk_name(y.name, 0, 2), order[n.name])
            add(f"{base}.up_proj", "up", layer, chunk_name(y.name, 1, 2), order[n.name])
        else:
            add(mod, m.get("role"), layer, y.name, order[n.name])
    for i, name in layer_out.items():
        probes.append(Probe(f"layers.{i}", "layer", i, name, None, order[name]))
    probes.append(Probe("logits", "logits", None, "logits", None, len(order)))
    return sorted(probes, key=lambda p: p.order)


# ---- targets ------------------------------------------------------------------------------------
TARGETS: dict[str, type] = {}


def register_target(name: str):
    """Register a backend usable as ``PATH:<name>`` in ``ptqc diff`` (class decorator)."""
    def deco(cls):
        cls.target = name
        TARGETS[name] = cls
        return cls
    return deco


class Target:
    """A model (QModel) and a way to compute the values of its graph nodes on token windows."""

    target = "?"
    OPTIONS: dict[str, type] = {}  # spec options (``PATH:TARGET,key=value``) and their types

    def __init__(self, path: Path, qm, spec: str, options: dict | None = None):
        self.path, self.qm, self.spec = path, qm, spec
        self.options = parse_options(self, options or {})

    @classmethod
    def option_types(cls) -> dict[str, type]:
        return cls.OPTIONS

    def probes(self) -> list[Probe]:
        """The comparable points of this side (default: from its ptqc graph)."""
        return graph_probes(self.qm)

    def info(self) -> dict:
        """Extra facts about this side for the report (options, lowering summary...)."""
        return {"options": self.options} if self.options else {}

    def prepare(self, names: list[str]) -> None:
        """Called once with the FX node names that ``run`` will be asked for."""

    def run(self, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.path} ({self.target})"


@register_target("torch")
class TorchTarget(Target):
    """The ptqc graph executed by torch, layer by layer (ptqc.calib.LayerRunner)."""

    device = None

    def run(self, batch, names):
        from ptqc.calib import LayerRunner

        want = _wanted(names)
        got: dict[str, torch.Tensor] = {}
        runner = LayerRunner(self.qm, [batch], device=self.device, check_finite=False)

        def hook(n, args, y, b):
            if n.name in want:
                _capture(want, got, n.name, y)

        def logits(b, y):
            got["logits"] = y.detach().float().cpu()

        for key in runner.freeze():
            runner.run(key, hook=hook, on_output=logits if key == "suffix" else None)
        return got


@register_target("onnx")
class OnnxTarget(Target):
    """The graph exported to ONNX (``mode``), run by an onnxruntime reference session."""

    mode = "fake"

    def prepare(self, names):
        from ptqc.lowering.onnx import export, session

        self.tmp = Path(tempfile.mkdtemp(prefix="ptqc-diff-onnx-"))
        self.export = export(self.qm, self.tmp / "model.onnx", self.mode, outputs=[n for n in names if n != "logits"])
        self.sess = session(self.export.path, reference=True)

    def run(self, batch, names):
        from ptqc.lowering.onnx import run

        return {k: torch.from_numpy(v).float() for k, v in run(self.sess, batch, names).items()}

    def close(self):
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


@register_target("onnx-int")
class OnnxIntegerTarget(OnnxTarget):
    mode = "integer"


@register_target("ascend")
class AscendTarget(TorchTarget):
    """The graph lowered to Ascend kernels in memory (``ptqc_npu`` ops), run by torch: the CPU
    emulation, or torch_npu kernels with ``device=npu``. Options: the ``ascend`` pass's (fuse,
    truncate, int_bias, fallback...: every keyword of :func:`ptqc.lowering.ascend.lower.lower`;
    ``fallback`` defaults to true here) and ``device``."""

    @classmethod
    def option_types(cls):
        import inspect

        from ptqc.lowering.ascend.lower import lower

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
            from ptqc.lowering.ascend.lower import lower

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


def cast_parameters(qm, dtype) -> int:
    """Run a graph in another float dtype: cast its float model parameters (``*.weight`` /
    ``*.bias``) and set ``qm.dtype`` (before lowering: the kernels' output dtype); quantization
    parameters (scales, zero points) stay as compiled (float32). Returns the number cast."""
    if isinstance(dtype, str):
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise PtqcError(f"dtype={dtype!r} is not a float dtype; use float16, bfloat16 or float32")
        dtype = dt
    n = 0
    for name in qm.weight_names():
        if name.endswith((".weight", ".bias")) and qm.store.spec(name)[1].is_floating_point \
                and qm.store.spec(name)[1] != dtype:
            qm.store[name] = qm.store[name].to(dtype)
            n += 1
    qm.dtype = dtype
    return n


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


def parse_options(t, options: dict) -> dict:
    """Check and convert a target's spec options (strings from the spec, or typed values)."""
    out = {}
    types = t.option_types()
    for k, v in options.items():
        if k not in types:
            have = f"options: {', '.join(types)}" if types else "no options"
            raise PtqcError(f"diff target {t.target!r} has no option {k!r} ({have})")
        typ = types[k]
        try:
            out[k] = (_bool(v) if typ is bool else typ(v)) if isinstance(v, str) else typ(v)
        except ValueError:
            raise PtqcError(f"diff target {t.target!r}: option {k}={v!r} is not a {typ.__name__}") from None
    return out


def split_spec(spec: str) -> tuple[Path, str, dict]:
    """``out/:ascend,fuse=false,device=npu:0`` -> (Path('out'), 'ascend', {'fuse': 'false', 'device': 'npu:0'})."""
    spec = str(spec)
    cut = len(spec)
    while (i := spec.rfind(":", 0, cut)) >= 0:
        name, _, opts = spec[i + 1:].partition(",")
        pairs = [kv.partition("=") for kv in opts.split(",")] if opts else []
        if name in TARGETS and all(k and sep for k, sep, _ in pairs):
            return Path(spec[:i] or "."), name, {k: v for k, _, v in pairs}
        cut = i
    path, sep, name = spec.rpartition(":")
    if sep and path and not Path(spec).exists() and Path(path).is_dir():
        raise PtqcError(f"unknown diff target {name.partition(',')[0]!r} in {spec!r}; targets: "
                        f"{', '.join(sorted(TARGETS))}")
    return Path(spec), "torch", {}


def parse_spec(spec: str) -> tuple[Path, str]:
    """``out/:onnx`` -> (Path('out'), 'onnx'); a suffix that is not a target is part of the path."""
    return split_spec(spec)[:2]


def open_target(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> Target:
    from ptqc import artifact

    path, name, options = split_spec(spec)
    if not path.is_dir():
        raise PtqcError(f"{path} is not a directory (give a model directory or a ptqc artifact)")
    cls = TARGETS[name]
    parse_options(cls, options)  # before loading anything
    qm = artifact.load_any(path, dtype, trust_remote_code)
    return cls(path, qm, spec, options)


# ---- same model? ------------------------------------------------------------------------------------
def _tokenizer_fingerprint(path: Path):
    f = path / "tokenizer.json"
    if f.is_file():
        data = json.loads(f.read_text())
        model = data.get("model", {})
        key = json.dumps({"model": model, "added": data.get("added_tokens")}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest(), len(model.get("vocab", {}) or {})
    from ptqc.evaluate import load_tokenizer

    tok = load_tokenizer(path)
    vocab = tok.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(), len(vocab)


def check_same_model(a: str, b: str, trust_remote_code: bool = False) -> None:
    """Refuse (one line) two specs whose models have different configs (architecture, sizes,
    vocabulary) or tokenizers. Reads only config.json and the tokenizer files (no weights, no trace)."""
    from ptqc.model import load_config

    (pa, _), (pb, _) = parse_spec(a), parse_spec(b)
    ca, cb = load_config(pa, trust_remote_code), load_config(pb, trust_remote_code)
    for k in CONFIG_KEYS:
        va, vb = getattr(ca, k, None), getattr(cb, k, None)
        if va != vb:
            raise PtqcError(f"cannot diff {a} and {b}: different models ({k} {va} vs {vb})")
    fa, fb = _tokenizer_fingerprint(pa), _tokenizer_fingerprint(pb)
    if fa[0] != fb[0]:
        raise PtqcError(f"cannot diff {a} and {b}: different tokenizers ({fa[1]} vs {fb[1]} tokens in the vocabulary, "
                        "tokenizer.json differs)")


# ---- metrics ------------------------------------------------------------------------------------------
class Acc:
    """Running sums of one probe over batches (float64 scalars; no values are kept)."""

    def __init__(self):
        self.x2 = self.e2 = self.xy = self.y2 = 0.0
        self.max_abs = self.max_rel = 0.0
        self.n = 0
        self.finite = True

    def update(self, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if x.shape != y.shape:
            raise PtqcError(f"{what}: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)}); not the same model?")
        x, y = x.float().reshape(-1), y.float().reshape(-1)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            self.finite = False
            return
        d = y - x
        self.x2 += float(torch.dot(x.double(), x.double()))
        self.e2 += float(torch.dot(d.double(), d.double()))
        self.xy += float(torch.dot(x.double(), y.double()))
        self.y2 += float(torch.dot(y.double(), y.double()))
        ad = d.abs()
        self.max_abs = max(self.max_abs, float(ad.max()) if ad.numel() else 0.0)
        ax = x.abs()
        floor = max(float(ax.max()) * 1e-6, 1e-30) if ax.numel() else 1e-30
        self.max_rel = max(self.max_rel, float((ad / ax.clamp_min(floor)).max()) if ad.numel() else 0.0)
        self.n += x.numel()

    def metrics(self) -> dict:
        if not self.finite:
            return {"max_abs": None, "max_rel": None, "sqnr_db": None, "cosine": None, "exact": False,
                    "finite": False, "numel": self.n}
        exact = self.e2 == 0.0
        sqnr = None if exact or self.x2 == 0.0 else 10.0 * math.log10(self.x2 / self.e2)
        den = math.sqrt(self.x2 * self.y2)
        cos = self.xy / den if den > 0 else (1.0 if exact else None)
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "sqnr_db": sqnr, "cosine": cos, "exact": exact,
                "finite": True, "numel": self.n}


def sqnr_value(m: dict) -> float:
    """SQNR for ranking/thresholds: exact = +inf, non-finite values = -inf."""
    if m.get("exact"):
        return math.inf
    v = m.get("sqnr_db")
    return -math.inf if v is None else v


# ---- inputs -------------------------------------------------------------------------------------------
def input_windows(a: Target, *, text=None, samples: int = 4, seqlen: int = 128, seed: int = 0,
                  calib=None) -> tuple[torch.Tensor, str]:
    """[samples, seqlen] token windows: the first windows of ``text`` (A's tokenizer), else random
    windows of A's calibration data (ptqc.data, the model's calib.txt / eval.txt or ``calib``)."""
    from ptqc import evaluate, pipeline

    if text is not None:
        ids = evaluate.tokenize(evaluate.load_tokenizer(a.path), evaluate.read_text(text))
        return evaluate.windows(ids, seqlen, str(text))[:samples], str(text)
    cfg = pipeline.calib_config(path=calib, samples=samples, seqlen=seqlen, seed=seed)
    ids = pipeline.PassContext(calib=cfg).calibration_ids(a.qm)
    from ptqc.data import default_calib

    return ids, str(calib or default_calib(a.path, a.qm))


# ---- the diff -----------------------------------------------------------------------------------------
def diff(a: Target, b: Target, ids: torch.Tensor, *, threshold: float = 40.0, batch_size: int = 1,
         linears: bool = True, progress=None) -> dict:
    """Compare B against A (the reference) on token windows ``ids`` [n, seqlen]."""
    t0 = time.perf_counter()
    check_same_model(a.spec, b.spec)
    pa = {p.key: p for p in a.probes() if linears or p.kind != "linear"}
    pb = {p.key: p for p in b.probes() if linears or p.kind != "linear"}
    keys = [k for k in pa if k in pb]  # A's depth order
    names_a = [pa[k].node for k in keys]
    names_b = [pb[k].node for k in keys]
    a.prepare(names_a)
    b.prepare(names_b)
    accs = {k: Acc() for k in keys}
    from ptqc.basis import Rotation

    rot_a, rot_b = Rotation.of(a.qm), Rotation.of(b.qm)  # rotated models: probes back to the float basis
    batches = list(torch.split(ids if ids.ndim == 2 else ids[None], batch_size))
    it = progress(batches, desc="diff", unit="batch") if progress else batches
    for batch in it:
        va = a.run(batch, names_a)
        vb = b.run(batch, names_b)
        for k in keys:
            x, y = va.get(pa[k].node), vb.get(pb[k].node)
            if x is None or y is None:
                raise PtqcError(f"probe {k}: no value from {a.spec if x is None else b.spec} for node "
                                f"{pa[k].node if x is None else pb[k].node}")
            if rot_a is not None:
                x = rot_a.to_float(pa[k].kind, pa[k].role, x)
            if rot_b is not None:
                y = rot_b.to_float(pb[k].kind, pb[k].role, y)
            accs[k].update(x, y, k)
        del va, vb
    rows = []
    for k in keys:
        p = pa[k]
        rows.append({"key": k, "kind": p.kind, "layer": p.layer, "role": p.role, "node_a": p.node,
                     "node_b": pb[k].node, **accs[k].metrics()})
    first = next((r["key"] for r in rows if sqnr_value(r) < threshold), None)
    finite = [sqnr_value(r) for r in rows]
    worst = min(range(len(rows)), key=lambda i: finite[i]) if rows else None
    return {
        "format": FORMAT, "version": VERSION,
        "a": {"spec": a.spec, "path": str(a.path), "target": a.target, **a.info()},
        "b": {"spec": b.spec, "path": str(b.path), "target": b.target, **b.info()},
        "unrotated": [side for side, r in (("a", rot_a), ("b", rot_b)) if r is not None],
        "samples": int(ids.shape[0]), "seqlen": int(ids.shape[-1]), "tokens": int(ids.numel()),
        "threshold_db": threshold, "first_below": first,
        "min_sqnr_db": None if worst is None or not math.isfinite(finite[worst]) else finite[worst],
        "min_sqnr_key": None if worst is None else rows[worst]["key"],
        "exact": all(r["exact"] for r in rows),
        "rows": rows,
        "unmatched": {"a_only": [k for k in pa if k not in pb], "b_only": [k for k in pb if k not in pa]},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def fails_under(report: dict, db: float) -> list[str]:
    """Probes whose SQNR is below ``db`` (non-finite values count as below)."""
    return [r["key"] for r in report["rows"] if sqnr_value(r) < db]


def format_table(report: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"A = {report['a']['spec']} ({report['a']['target']})   B = {report['b']['spec']} "
             f"({report['b']['target']})   {report['samples']} windows x {report['seqlen']} tokens",
             f"{'#':>3} {'probe':44s} {'kind':6s} {'max_abs':>10s} {'max_rel':>10s} {'SQNR dB':>8s} {'cosine':>10s}"]
    for i, r in enumerate(report["rows"]):
        sq = "exact" if r["exact"] else ("nan" if not r["finite"] else f(r["sqnr_db"], ".2f"))
        mark = "  <- first below {:g} dB".format(report["threshold_db"]) if r["key"] == report["first_below"] else ""
        lines.append(f"{i:>3} {r['key'][:44]:44s} {r['kind']:6s} {f(r['max_abs'], '10.3e')} {f(r['max_rel'], '10.3e')} "
                     f"{sq:>8s} {f(r['cosine'], '10.7f')}{mark}")
    mn = report["min_sqnr_db"]
    lines.append(f"min SQNR: {'inf (all exact)' if report['exact'] else ('-inf/nan' if mn is None else f'{mn:.2f} dB')}"
                 f" at {report['min_sqnr_key']}; first below {report['threshold_db']:g} dB: "
                 f"{report['first_below'] or 'none'}  ({report['seconds']:.1f}s)")
    for side in ("a", "b"):
        if report[side].get("refused"):
            lines.append(f"{side.upper()}: {len(report[side]['refused'])} linear group(s) not lowered (kept as "
                         f"fake-quant ops), first: {report[side]['refused'][0]}")
    if report["unmatched"]["a_only"] or report["unmatched"]["b_only"]:
        def names(ks):
            return f" ({', '.join(ks[:4])}{', ...' if len(ks) > 4 else ''})" if ks else ""
        ao, bo = report["unmatched"]["a_only"], report["unmatched"]["b_only"]
        lines.append(f"unmatched probes: A only {len(ao)}{names(ao)}, B only {len(bo)}{names(bo)}")
    return "\n".join(lines)


def plot(report: dict, path, cap: float = 160.0) -> None:
    """PNG of SQNR along depth (exact matches drawn at ``cap``), layer outputs as a line, linears
    as points, the threshold dashed and the first probe below it circled."""
    from matplotlib.figure import Figure

    rows = report["rows"]
    fig = Figure(figsize=(max(8.0, 0.08 * len(rows) + 4), 4.5), layout="constrained")
    ax = fig.subplots()

    def val(r):
        v = sqnr_value(r)
        return cap if v == math.inf else (math.nan if v == -math.inf else min(v, cap))
    for kind, style, label in (("linear", ".", "linears"), ("layer", "o-", "decoder layer outputs"),
                               ("embed", "s", "embedding"), ("logits", "D", "logits")):
        xs = [i for i, r in enumerate(rows) if r["kind"] == kind]
        if xs:
            ax.plot(xs, [val(rows[i]) for i in xs], style, label=label, markersize=4 if kind == "linear" else 6)
    ax.axhline(report["threshold_db"], color="red", ls="--", lw=1, label=f"threshold {report['threshold_db']:g} dB")
    if report["first_below"] is not None:
        i = next(i for i, r in enumerate(rows) if r["key"] == report["first_below"])
        ax.plot([i], [val(rows[i])], "o", ms=14, mfc="none", color="red")
        ax.annotate(report["first_below"], (i, val(rows[i])), textcoords="offset points", xytext=(5, -14),
                    fontsize=8, color="red")
    layer_ticks = [(i, r["layer"]) for i, r in enumerate(rows) if r["kind"] == "layer"]
    if layer_ticks and len(layer_ticks) <= 40:
        ax.set_xticks([i for i, _ in layer_ticks], [str(layer) for _, layer in layer_ticks])
    ax.set_xlabel("depth (ticks: decoder layer outputs)")
    ax.set_ylabel(f"SQNR dB (B vs A; exact drawn at {cap:g})")
    ax.set_title(f"{report['b']['spec']} vs {report['a']['spec']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


__all__ = ["diff", "open_target", "parse_spec", "split_spec", "register_target", "TARGETS", "Target", "graph_probes",
           "lowered_probes", "is_lowered", "AscendTarget",
           "check_same_model", "input_windows", "fails_under", "format_table", "plot", "Acc"]
