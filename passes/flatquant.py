"""flatquant: learned affine transforms + clipping for W4A4 (FlatQuant, Sun et al., 2024).

Per group of linears sharing one input, a learnable invertible transform ``P = P1 (x) P2``
(Kronecker factors, ``n1 * n2 = in_features``, n1 ~ n2) and a per-channel scale ``s``::

    y = Q_a((x / s) P) . Q_w((W s) P^-T)^T          (= x W^T in float)

with learnable clipping (weights per row, activations per tensor; sigmoid logits starting at 4).
``s`` starts SmoothQuant-style (alpha 0.3), the matrices as seeded random orthogonal ones.

Where the transforms go (per decoder layer)::

    input_norm -> q, k, v     1/s folded into the norm weight; P online before q/k/v
    post_norm  -> gate, up    the same with the post-attention norm
    act(gate)*up -> down      1/s folded into up_proj's rows (and bias); P online before down
    attention -> o_proj       P = O (x) V over (heads, head_dim): V folded into v_proj's rows
                              (exact under GQA), the head-mixing O online; no scale
    q, k (after RoPE)         k_transform: k <- k K, q <- q K^-T (online), trained only when
                              ``kv_bits`` < 16 simulates the cache quantization of a later `kv`

Training (:mod:`.flatquant_train`): layer by layer on the float model's layer inputs, AdamW on the
MSE between the quantized and the float layer output; straight-through rounding. Then the graph
gets the transform nodes, one dynamic per-token ``quantize_act`` per transformed input and
(``quantize=true``) weight codes of the clipped transformed weights; ``quantize=false`` leaves
float weights for a later weight pass. ``auto=N`` re-trains outlier layers (relative loss over
median + 3 MAD) with N x epochs and keeps the better run.

Modules: this one (the pass, the graph rewrite), ``flatquant_plan`` (which linears share which
transform), ``flatquant_model`` (numerics, parameters, the layer interpreter), ``flatquant_train``,
``flatquant_plot``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptqc import ops, quant
from ptqc.calib import calibration_batches, split
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.passes.act_quant import insert_quantizer
from ptqc.passes.flatquant_model import LayerModel, layer_weights
from ptqc.passes.flatquant_plan import LayerPlan, plan_layers
from ptqc.passes.flatquant_train import retrain_outliers, train_layers
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import plan, set_quantized_weight


@register
class FlatQuant(Pass):
    """FlatQuant: learned Kronecker transforms + scales + clipping, trained per layer, for W4A4.

    Per linear group (q/k/v, gate/up, down, o) a learnable P1 (x) P2 transform (online before the
    linears, P^-T folded into the weights), a per-channel scale (folded into the norm / up_proj,
    SmoothQuant init alpha=0.3) and sigmoid clips of weights (per row) and activations; trained
    layer by layer with AdamW on the layer output MSE (epochs=15, lr=5e-3). Inserts dynamic
    per-token quantize_act nodes and (quantize=true) per-channel weight codes. `k_transform`
    adds a learned Q/K transform for the KV cache (trained when kv_bits < 16; then run `kv`).
    `auto=N` re-trains outlier layers with N x epochs. Per-layer lr/epochs via recipe overrides.
    """

    name = "flatquant"
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant", "act_quant", "flatquant"})
    forbids = frozenset({"weight_quant", "act_quant", "smoothed", "rotated"})

    @dataclass
    class Options:
        w_bits: int = 4  # 2..8, 16 = weights stay float
        a_bits: int = 4  # 2..8, 16 = activations stay float
        w_group: int = 0  # 0 = per output channel
        w_sym: bool = True
        a_sym: bool = True
        epochs: int = 15
        lr: float = 5e-3
        alpha: float = 0.3  # SmoothQuant-style init of the per-channel scales
        clip: bool = True  # learnable weight / activation clipping
        k_transform: bool = True  # online Q/K transform for the KV cache
        kv_bits: int = 16  # KV-cache quantization simulated while training (per token/head), 16 = none
        kv_sym: bool = False
        quantize: bool = True  # false: leave clipped transformed float weights (e.g. before gptq)
        auto: int = 0  # re-train outlier layers with auto x epochs (0 = off)
        seed: int = 0  # of the random orthogonal initial transforms
        include: list[str] = field(default_factory=lambda: ["*"])
        exclude: list[str] = field(default_factory=lambda: ["lm_head"])

        def validate(self):
            for k in ("w_bits", "a_bits", "kv_bits"):
                v = getattr(self, k)
                if not (2 <= v <= 8 or v == 16):
                    raise PtqcError(f"{k}={v} must be in 2..8, or 16 to keep float")
            if self.w_group < 0:
                raise PtqcError(f"w_group={self.w_group} must be 0 (per channel) or a positive group size")
            if self.epochs < 0:
                raise PtqcError(f"epochs={self.epochs} must be >= 0")
            if not (self.lr > 0 and math.isfinite(self.lr)):
                raise PtqcError(f"lr={self.lr} must be a positive number")
            if not 0.0 <= self.alpha <= 1.0:
                raise PtqcError(f"alpha={self.alpha} must be in [0, 1]")
            if self.auto < 0:
                raise PtqcError(f"auto={self.auto} must be >= 0 (0 = off)")

        def weight_spec(self) -> quant.QuantSpec | None:
            return quant.QuantSpec(self.w_bits, self.w_group, self.w_sym) if self.w_bits < 16 else None

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        # what holds afterwards depends on the options (an instance attribute shadows the class one)
        self.provides = frozenset({"flatquant"} | ({"weight_quant"} if o.quantize and o.w_bits < 16 else set())
                                  | ({"act_quant"} if o.a_bits < 16 else set()))

    # -- planning --
    def select(self, qm) -> dict:
        """The linears to transform and quantize: linear name -> its options."""
        selected = {}
        for n, mo, _ in plan(qm, self):
            if info(n).get("layer") is None:
                raise PtqcError(f"flatquant transforms decoder-layer linears only; {info(n)['module']} is outside "
                                "them: exclude it (exclude=lm_head) and quantize it with rtn or w4a4")
            selected[n.name] = mo
        return selected

    # -- training --
    def run(self, qm, ctx) -> PassResult:
        o = self.options
        plans = plan_layers(qm, self.select(qm))
        if not plans:
            return PassResult(changed=False, summary={"layers": []})
        ids = ctx.calibration_ids(qm)
        batches = calibration_batches(ids, ctx.calib_batch_size)
        params, records = train_layers(qm, ctx, plans, batches, {i: plans[i].opts.epochs for i in plans},
                                       "flatquant", o)
        auto = retrain_outliers(qm, ctx, plans, batches, params, records, o) if o.auto > 0 else None
        # rewrite the graph (nothing changed until here: training saw the float graph throughout)
        counts = {"transforms": 0, "act_quant": 0, "weights_quantized": 0}
        for i, pl in plans.items():
            self._apply(qm, pl, params[i], counts)
        summary = {"samples": int(ids.shape[0]), "tokens": int(ids.numel()), "batch_size": ctx.calib_batch_size,
                   "propagate": "float", **counts, "quantized": bool(o.quantize and o.w_bits < 16),
                   "layers": [records[i] for i in sorted(records)]}
        if auto is not None:
            summary["auto"] = auto
        return PassResult(changed=True, summary=summary)

    # -- graph rewrite --
    def _apply(self, qm, pl: LayerPlan, params: dict, counts: dict) -> None:
        """Fold layer ``pl``'s trained parameters into its weights and insert its online transforms
        and activation quantizers."""
        seg = {s.key: s for s in split(qm.graph)}[f"layer.{pl.layer}"]
        # the rewrite is computed where the weight store keeps its tensors (host memory)
        weights = layer_weights(qm, seg, torch.device("cpu"))
        model = LayerModel(qm, pl, seg, weights, torch.device("cpu"), params=params)
        with torch.no_grad():
            mats = model.matrices()
            new_w = {n.name: model.weight(n, mats, fake_quant=False) for n in pl.linears()}
            norms = {g.prev.args[1].target: model.norm_weight(g.prev, weights[g.prev.args[1].target])
                     for g in pl.groups if g.prev is not None and is_op(g.prev, ops.RMS_NORM)}
        for name, w in norms.items():
            qm.store[name] = w.to(qm.dtype)
        for n in pl.linears():
            self._write_linear(qm, model, n, *new_w[n.name], f"{n.name}.wmax" in params, counts)
        _insert_transforms(qm, pl, mats, params, counts)
        if pl.attn is not None:
            _insert_k_transform(qm, pl, mats["k"])
            counts["transforms"] += 2
        qm.store.release(seg.weights)

    def _write_linear(self, qm, model: LayerModel, n, w, b, clipped: bool, counts: dict) -> None:
        """Store linear ``n``'s new weight ``w`` (quantized if it is selected and quantize=true) and bias ``b``."""
        spec = model.specs.get(n.name)
        b_node = n.args[2] if len(n.args) > 2 else None
        if isinstance(b_node, fx.Node) and b is not None:
            qm.store[b_node.target] = b.to(qm.dtype)
        g = model.group_of.get(n.name)
        if spec is not None and self.options.quantize:
            set_quantized_weight(qm, n, spec, *quant.rtn(w, spec), "flatquant",
                                 {"transform": g.module if g else None, "clipped": clipped})
            counts["weights_quantized"] += 1
        else:
            qm.store[n.args[1].target] = w.to(qm.dtype)


def _insert_transforms(qm, pl: LayerPlan, mats: dict, params: dict, counts: dict) -> None:
    """A transform node before each group's linears (and its activation quantizer)."""
    g_ = qm.graph
    order = {n.name: i for i, n in enumerate(g_.nodes)}
    for g in pl.groups:
        a, b = mats[g.gid][:2]
        if g.kind == "o":
            b = torch.eye(b.shape[0])
        qm.store[f"{g.module}.left"] = a.detach().float().contiguous()
        qm.store[f"{g.module}.right"] = b.detach().float().contiguous()
        first = min(g.lins, key=lambda n: order[n.name])
        with g_.inserting_before(first):
            an, bn = g_.get_attr(f"{g.module}.left"), g_.get_attr(f"{g.module}.right")
            t = g_.call_function(ops.TRANSFORM, (g.src, an, bn))
        info(t).update({"module": g.module, "layer": pl.layer, "role": "transform",
                        "transform": {"kind": g.kind, "dims": list(g.dims), "scaled": g.prev is not None}})
        counts["transforms"] += 1
        for n in g.lins:
            n.args = (t, *n.args[1:])
        sel = [n for n in g.lins if n.name in g.selected]
        if g.a_opts is not None and sel:
            c = float(torch.sigmoid(params[f"{g.gid}.act_clip"])) if f"{g.gid}.act_clip" in params else 1.0
            spec = quant.QuantSpec(g.a_opts.a_bits, 0, g.a_opts.a_sym, c)
            insert_quantizer(qm, t, sel, spec, method="flatquant")
            counts["act_quant"] += 1


def _insert_k_transform(qm, pl: LayerPlan, k_mats: tuple) -> None:
    """The K-cache transform: k <- k K and q <- q K^-T before the attention node."""
    g_ = qm.graph
    kk, ki = k_mats
    base = f"{info(pl.attn)['module']}.k_transform"
    qm.store[f"{base}.q"] = ki.detach().float().contiguous()
    qm.store[f"{base}.k"] = kk.detach().float().contiguous()
    with g_.inserting_before(pl.attn):
        qn, kn = g_.get_attr(f"{base}.q"), g_.get_attr(f"{base}.k")
        tq = g_.call_function(ops.TRANSFORM, (pl.attn.args[0], qn, None))
        tk = g_.call_function(ops.TRANSFORM, (pl.attn.args[1], kn, None))
    for t, which in ((tq, "q"), (tk, "k")):
        info(t).update({"module": base, "layer": pl.layer, "role": "transform",
                        "transform": {"kind": f"k_cache_{which}", "dims": [pl.head_dim]}})
    pl.attn.args = (tq, tk, *pl.attn.args[2:])
