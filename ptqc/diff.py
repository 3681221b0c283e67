"""``ptqc diff A B``: run two backends on the same tokens and compare every intermediate they share.

Specs (``PATH[:TARGET]``; a suffix that is not a registered target name is part of the path):

    model/            a Hugging Face model directory: the float graph, run by torch  (target ``torch``)
    out/              a ptqc artifact: its (fake-quant) graph, run by torch          (target ``torch``)
    out/:onnx         the artifact exported to ONNX (``mode="fake"``), run by onnxruntime with every
                      graph optimization disabled (the reference session)
    out/:onnx-int     the same with ``mode="integer"`` (MatMulInteger / MatMulNBits kernels)

Targets are a registry (:data:`TARGETS`, :func:`register_target`): a backend added later (the
Ascend emulation of #7) registers a class with ``run(batch, names) -> {name: tensor}`` and is
usable as ``out/:ascend`` at once.

What is compared (*probes*, taken from each side's ptqc graph and matched by key):

* ``embed``           the embedding output;
* ``<module path>``   every linear, keyed by its module path (``model.layers.3.mlp.down_proj``;
                      ``#j`` appended when a module runs several times), as in ``ptqc diagnose``;
* ``layers.<i>``      the output of decoder layer i (the residual stream it leaves,
                      :func:`ptqc.diagnose._layer_output`);
* ``logits``.

ONNX targets expose the probes as extra graph outputs by FX node name (the lowering keeps the
names). Depth order is the order of A's graph. With ``x`` the values of A (the reference) and ``y``
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


def graph_probes(qm) -> list[Probe]:
    """The comparable points of a ptqc graph, in graph order."""
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

    def __init__(self, path: Path, qm, spec: str):
        self.path, self.qm, self.spec = path, qm, spec

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

    def run(self, batch, names):
        from ptqc.calib import LayerRunner

        want = set(names)
        got: dict[str, torch.Tensor] = {}
        runner = LayerRunner(self.qm, [batch], check_finite=False)

        def hook(n, args, y, b):
            if n.name in want:
                got[n.name] = y.detach().float()

        def logits(b, y):
            got["logits"] = y.detach().float()

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


def parse_spec(spec: str) -> tuple[Path, str]:
    """``out/:onnx`` -> (Path('out'), 'onnx'); a suffix that is not a target is part of the path."""
    path, sep, name = str(spec).rpartition(":")
    if sep and name in TARGETS:
        return Path(path or "."), name
    if sep and path and not Path(spec).exists() and Path(path).is_dir():
        raise PtqcError(f"unknown diff target {name!r} in {spec!r}; targets: {', '.join(sorted(TARGETS))}")
    return Path(spec), "torch"


def open_target(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> Target:
    from ptqc import artifact

    path, name = parse_spec(spec)
    if not path.is_dir():
        raise PtqcError(f"{path} is not a directory (give a model directory or a ptqc artifact)")
    qm = artifact.load_any(path, dtype, trust_remote_code)
    return TARGETS[name](path, qm, spec)


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
    pa = {p.key: p for p in graph_probes(a.qm) if linears or p.kind != "linear"}
    pb = {p.key: p for p in graph_probes(b.qm) if linears or p.kind != "linear"}
    keys = [k for k in pa if k in pb]  # A's depth order
    names_a = [pa[k].node for k in keys]
    names_b = [pb[k].node for k in keys]
    a.prepare(names_a)
    b.prepare(names_b)
    accs = {k: Acc() for k in keys}
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
        "a": {"spec": a.spec, "path": str(a.path), "target": a.target},
        "b": {"spec": b.spec, "path": str(b.path), "target": b.target},
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
    if report["unmatched"]["a_only"] or report["unmatched"]["b_only"]:
        lines.append(f"unmatched probes: A only {len(report['unmatched']['a_only'])}, "
                     f"B only {len(report['unmatched']['b_only'])}")
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


__all__ = ["diff", "open_target", "parse_spec", "register_target", "TARGETS", "Target", "graph_probes",
           "check_same_model", "input_windows", "fails_under", "format_table", "plot", "Acc"]
