"""``ptqc diff A B``: run two backends on the same tokens and compare every intermediate they share.

A side is a spec ``PATH[:TARGET[,key=value...]]`` (:mod:`ptqc.diff_targets`): a model directory
or an artifact run by torch (``torch``, the default), or a target a backend offers
(:mod:`ptqc.backends`: ``onnx``, ``onnx-int``, ``ascend``); ``ptqc diff --help`` lists them.

What is compared: the *probes* of each side (:mod:`ptqc.probes`: the embedding, every linear,
every decoder layer output, the logits), matched by key; probes found on one side only are
listed in ``unmatched``, never an error. A side compiled with ``rotate`` has its values mapped
back to the float basis first (:mod:`ptqc.basis`; listed under ``unrotated``).

Depth order is the order of A's graph. With ``x`` the values of A (the reference) and ``y``
those of B, summed over every element of every window (:mod:`ptqc.diff_metrics`):

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
import time
from pathlib import Path

import torch

from ptqc.diff_metrics import Acc, fails_under, sqnr_value
from ptqc.diff_report import format_table, plot
from ptqc.diff_targets import (TARGETS, Target, TorchTarget, cast_parameters, open_target, parse_options, parse_spec,
                               register_target, split_spec)
from ptqc.errors import PtqcError
from ptqc.probes import Probe, graph_probes

FORMAT = "ptqc-diff"
VERSION = 1
CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings")


def is_lowered(qm) -> bool:
    """Has the graph been lowered in place to a backend's kernels (Ascend: ``ptqc_npu`` ops)?"""
    from ptqc import backends

    return backends.lowered_by(qm) is not None


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
def _accumulate(a: Target, b: Target, pa: dict, pb: dict, keys: list, batches, rot) -> dict[str, Acc]:
    """Run both sides batch by batch; the metric sums of every matched probe."""
    names_a, names_b = [pa[k].node for k in keys], [pb[k].node for k in keys]
    a.prepare(names_a)
    b.prepare(names_b)
    accs = {k: Acc() for k in keys}
    for batch in batches:
        va, vb = a.run(batch, names_a), b.run(batch, names_b)
        for k in keys:
            x, y = va.get(pa[k].node), vb.get(pb[k].node)
            if x is None or y is None:
                raise PtqcError(f"probe {k}: no value from {a.spec if x is None else b.spec} for node "
                                f"{pa[k].node if x is None else pb[k].node}")
            if rot["a"] is not None:
                x = rot["a"].to_float(pa[k].kind, pa[k].role, x)
            if rot["b"] is not None:
                y = rot["b"].to_float(pb[k].kind, pb[k].role, y)
            accs[k].update(x, y, k)
        del va, vb
    return accs


def diff(a: Target, b: Target, ids: torch.Tensor, *, threshold: float = 40.0, batch_size: int = 1,
         linears: bool = True, progress=None) -> dict:
    """Compare B against A (the reference) on token windows ``ids`` [n, seqlen]."""
    from ptqc.basis import Rotation

    t0 = time.perf_counter()
    check_same_model(a.spec, b.spec)
    pa = {p.key: p for p in a.probes() if linears or p.kind != "linear"}
    pb = {p.key: p for p in b.probes() if linears or p.kind != "linear"}
    keys = [k for k in pa if k in pb]  # A's depth order
    rot = {"a": Rotation.of(a.qm), "b": Rotation.of(b.qm)}  # rotated models: probes back to the float basis
    batches = list(torch.split(ids if ids.ndim == 2 else ids[None], batch_size))
    accs = _accumulate(a, b, pa, pb, keys, progress(batches, desc="diff", unit="batch") if progress else batches, rot)
    rows = [{"key": k, "kind": pa[k].kind, "layer": pa[k].layer, "role": pa[k].role, "node_a": pa[k].node,
             "node_b": pb[k].node, **accs[k].metrics()} for k in keys]
    sq = [sqnr_value(r) for r in rows]
    worst = min(range(len(rows)), key=lambda i: sq[i]) if rows else None
    return {
        "format": FORMAT, "version": VERSION,
        "a": {"spec": a.spec, "path": str(a.path), "target": a.target, **a.info()},
        "b": {"spec": b.spec, "path": str(b.path), "target": b.target, **b.info()},
        "unrotated": [side for side, r in rot.items() if r is not None],
        "samples": int(ids.shape[0]), "seqlen": int(ids.shape[-1]), "tokens": int(ids.numel()),
        "threshold_db": threshold, "first_below": next((r["key"] for r in rows if sqnr_value(r) < threshold), None),
        "min_sqnr_db": None if worst is None or not math.isfinite(sq[worst]) else sq[worst],
        "min_sqnr_key": None if worst is None else rows[worst]["key"],
        "exact": all(r["exact"] for r in rows),
        "rows": rows,
        "unmatched": {"a_only": [k for k in pa if k not in pb], "b_only": [k for k in pb if k not in pa]},
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["diff", "open_target", "parse_spec", "split_spec", "parse_options", "register_target", "TARGETS", "Target",
           "TorchTarget", "Probe", "graph_probes", "is_lowered", "cast_parameters", "check_same_model",
           "input_windows", "fails_under", "format_table", "plot", "Acc", "sqnr_value"]
