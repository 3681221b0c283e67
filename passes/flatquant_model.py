"""flatquant's learnable layer: differentiable numerics, one layer's parameters (transforms, scales,
clips) and its weights with them folded in, and the interpreters that run the layer segment with
:data:`ptqc.ops.EAGER`: in float (:class:`EagerLayer`) and with the learnable pieces substituted
(:class:`QuantizedLayer`, whose forward values equal the rewritten graph's)."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ptqc import ops, quant
from ptqc.interpreter import Interpreter
from ptqc.ir import is_op
from ptqc.passes.smooth import smooth_scale

CLIP_INIT = 4.0  # sigmoid(4) = 0.982


# ---- numerics -------------------------------------------------------------------------------
def kron_dims(n: int) -> tuple[int, int]:
    """n = n1 * n2 with n1 <= n2 as close as possible (256 -> 16, 16; 384 -> 16, 24)."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def init_matrix(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random orthogonal n x n matrix (FlatQuant's initialisation)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _inv_t(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(m.double()).t().to(m.dtype)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_quant(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: quant.QuantSpec) -> torch.Tensor:
    """Differentiable twin of quant.compute_qparams + quantize + dequantize over the last dim of
    ``xg`` with the (possibly clipped) range [lo, hi] (same forward values)."""
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(_round_ste(xg / scale), spec.qmin, spec.qmax) * scale
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = (hi - lo) / float((1 << spec.bits) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax).detach()
    return (torch.clamp(_round_ste(xg / scale) + zp, spec.qmin, spec.qmax) - zp) * scale


def fake_quant_act(x: torch.Tensor, bits: int, sym: bool, clip_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token activation fake-quant (ops.quantize_act, group 0) with a learnable clip."""
    h = x.float()
    lo, hi = h.amin(-1, keepdim=True), h.amax(-1, keepdim=True)
    if clip_logit is not None:
        c = torch.sigmoid(clip_logit)
        lo, hi = lo * c, hi * c
    return _fake_quant(h, lo, hi, quant.QuantSpec(bits, 0, sym)).to(x.dtype)


def clip_weight(w: torch.Tensor, lmax: torch.Tensor | None, lmin: torch.Tensor | None) -> torch.Tensor:
    """Clamp each row to [min * sigmoid(lmin), max * sigmoid(lmax)] (learnable weight clipping)."""
    if lmax is None:
        return w
    hi = w.amax(1, keepdim=True) * torch.sigmoid(lmax)
    lo = w.amin(1, keepdim=True) * torch.sigmoid(lmin)
    return torch.minimum(torch.maximum(w, lo), hi)


def fake_quant_weight(w: torch.Tensor, spec: quant.QuantSpec) -> torch.Tensor:
    """Differentiable twin of quant.fake_quantize (per row or per group)."""
    g = w.shape[1] if spec.group_size == 0 else spec.group_size
    wg = w.reshape(w.shape[0], -1, g)
    return _fake_quant(wg, wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True), spec).reshape(w.shape)


def f32(v):
    """A floating tensor in float32 (training and the rewrite compute in float32); anything else as is."""
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def layer_weights(qm, seg, device) -> dict:
    """The segment's weights in float32 on ``device``, by tensor name."""
    return {name: f32(qm.store[name]).to(device) for name in seg.weights}


# ---- one layer's learnable model --------------------------------------------------------------
class LayerModel:
    """The parameters of one layer (:class:`~ptqc.passes.flatquant_plan.LayerPlan`) over its
    segment's float ``weights`` (by tensor name)."""

    def __init__(self, qm, plan, seg, weights: dict, device, *, seed: int = 0, stats=None,
                 kv_bits: int = 16, kv_sym: bool = False, params: dict | None = None):
        self.qm, self.plan, self.seg, self.weights, self.device = qm, plan, seg, weights, device
        self.kv_bits, self.kv_sym = kv_bits, kv_sym
        self.group_of = {n.name: g for g in plan.groups for n in g.lins}
        self.v_group = {g.v_lin.name: g for g in plan.groups if g.v_lin is not None}
        self.prev_of = {g.prev.name: g for g in plan.groups if g.prev is not None}  # norm / up -> group
        self.rewritten = {n.name: n for n in plan.linears()}  # linears whose weights change, by name
        self.specs = {}
        for g in plan.groups:
            for name, mo in g.selected.items():
                if mo.weight_spec() is not None:
                    self.specs[name] = mo.weight_spec()
        produced = {n.name for n in seg.nodes}
        self.outputs = sorted(k for k in seg.keep if k in produced)
        self.p: dict[str, torch.Tensor] = {}
        if params is not None:
            self.p = {k: v.to(device).clone() for k, v in params.items()}
        else:
            self._init(seed, stats or {})

    # -- parameters --
    def _init(self, seed: int, stats: dict) -> None:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + self.plan.layer)
        dev = self.device
        for g in self.plan.groups:
            n1, n2 = g.dims
            self.p[f"{g.gid}.left"] = init_matrix(n1, gen).to(dev)
            self.p[f"{g.gid}.right"] = init_matrix(n2, gen).to(dev)
            if g.prev is not None:
                w_max = torch.stack([self.weights[n.args[1].target].abs().amax(0) for n in g.lins]).amax(0)
                s = smooth_scale(stats[g.gid].to(dev), w_max, self.plan.opts.alpha)
                self.p[f"{g.gid}.log_s"] = s.log()
            if g.a_opts is not None and g.a_opts.clip:
                self.p[f"{g.gid}.act_clip"] = torch.full((), CLIP_INIT, device=dev)
            for name, mo in g.selected.items():
                if name in self.specs and mo.clip:
                    out = self.weights[self.rewritten[name].args[1].target].shape[0]
                    self.p[f"{name}.wmax"] = torch.full((out, 1), CLIP_INIT, device=dev)
                    self.p[f"{name}.wmin"] = torch.full((out, 1), CLIP_INIT, device=dev)
        if self.plan.attn is not None:
            self.p["k.matrix"] = init_matrix(self.plan.head_dim, gen).to(dev)

    def param_groups(self, lr: float) -> list[dict]:
        mats = [v for k, v in self.p.items() if k.endswith((".left", ".right", ".matrix"))]
        if self.plan.attn is not None and self.kv_bits >= 16:  # nothing to learn: the loss ignores K
            mats = [v for k, v in self.p.items() if k.endswith((".left", ".right"))]
        scales = [v for k, v in self.p.items() if k.endswith(".log_s")]
        clips = [v for k, v in self.p.items() if k.endswith((".act_clip", ".wmax", ".wmin"))]
        groups = [{"params": mats, "lr": lr}, {"params": scales, "lr": lr, "weight_decay": 0.0},
                  {"params": clips, "lr": lr * 10, "weight_decay": 0.0}]
        for gr in groups:
            for t in gr["params"]:
                t.requires_grad_(True)
        return [gr for gr in groups if gr["params"]]

    def export(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.p.items()}

    def matrices(self) -> dict:
        m = {}
        for g in self.plan.groups:
            a, b = self.p[f"{g.gid}.left"], self.p[f"{g.gid}.right"]
            m[g.gid] = (a, b, _inv_t(a), _inv_t(b))
        if self.plan.attn is not None:
            k = self.p["k.matrix"]
            m["k"] = (k, _inv_t(k))
        return m

    # -- weights --
    def weight(self, n: fx.Node, mats: dict, *, fake_quant: bool = True):
        """(weight, bias) of linear n: scaled, transformed, folded, clipped (and fake-quantized)."""
        w = self.weights[n.args[1].target]
        b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("b")
        b = self.weights[b_node.target] if isinstance(b_node, fx.Node) else None
        g = self.group_of.get(n.name)
        if g is not None:
            if g.prev is not None:
                w = w * self.p[f"{g.gid}.log_s"].exp()
            _, _, ai, bi = mats[g.gid]
            w = ops._transform(w, ai, bi)
        vg = self.v_group.get(n.name)
        if vg is not None:  # o's per-head transform on v's output rows
            vt = mats[vg.gid][1]
            d = vt.shape[0]
            w = torch.einsum("de,hdi->hei", vt, w.reshape(-1, d, w.shape[1])).reshape(w.shape)
            if b is not None:
                b = (b.reshape(-1, d) @ vt).reshape(b.shape)
        pg = self.prev_of.get(n.name)
        if pg is not None:  # down's scale folded into up's rows
            s = self.p[f"{pg.gid}.log_s"].exp()
            w = w / s[:, None]
            if b is not None:
                b = b / s
        if n.name in self.specs:
            w = clip_weight(w, self.p.get(f"{n.name}.wmax"), self.p.get(f"{n.name}.wmin"))
            if fake_quant:
                w = fake_quant_weight(w, self.specs[n.name])
        return w, b

    def norm_weight(self, norm: fx.Node, w: torch.Tensor) -> torch.Tensor:
        g = self.prev_of[norm.name]
        offset = norm.args[3] if len(norm.args) > 3 else norm.kwargs.get("offset", 0.0)
        return (w + offset) / self.p[f"{g.gid}.log_s"].exp() - offset

    def forward(self, state: dict, mats: dict | None = None) -> dict:
        """Run the layer segment on one batch's state with the learnable pieces substituted;
        returns the values it produces for later segments."""
        env = dict(state)
        QuantizedLayer(self, self.matrices() if mats is None else mats).run(env)
        return {k: env[k] for k in self.outputs}


class EagerLayer(Interpreter):
    """A layer model's segment with the differentiable ops of :data:`ptqc.ops.EAGER` on its float
    weights; ``hook(n, y)`` sees every value."""

    def __init__(self, model: LayerModel, hook=None):
        super().__init__(model.seg.nodes, model.weights, device=model.device, keep=model.seg.keep)
        self.model, self.hook = model, hook

    def call_function(self, n, args, kwargs):
        return ops.EAGER.get(n.target, n.target)(*args, **kwargs)

    def after_node(self, n, args, y):
        if self.hook is not None:
            self.hook(n, y)


class QuantizedLayer(EagerLayer):
    """The layer with its transforms, scales, clips and fake quantizers (matrices ``mats``)."""

    def __init__(self, model: LayerModel, mats: dict):
        super().__init__(model)
        self.mats = mats
        self.inputs: dict = {}  # group id -> (transformed input, fake-quantized)

    def call_function(self, n, args, kwargs):
        m = self.model
        if n.name in m.rewritten:
            return self.linear(n, args[0])
        if n.name in m.prev_of and is_op(n, ops.RMS_NORM):
            return ops.EAGER[ops.RMS_NORM](args[0], m.norm_weight(n, args[1]), *args[2:], **kwargs)
        if n is m.plan.attn:
            return self.attention(args, kwargs)
        return super().call_function(n, args, kwargs)

    def linear(self, n: fx.Node, x: torch.Tensor) -> torch.Tensor:
        m, g = self.model, self.model.group_of.get(n.name)
        if g is not None:
            if g.gid not in self.inputs:
                a, b = self.mats[g.gid][:2]
                if g.kind == "o":
                    b = torch.eye(b.shape[0], device=m.device)
                t = ops._transform(x, a, b)
                tq = t if g.a_opts is None else fake_quant_act(t, g.a_opts.a_bits, g.a_opts.a_sym,
                                                              m.p.get(f"{g.gid}.act_clip"))
                self.inputs[g.gid] = (t, tq)
            x = self.inputs[g.gid][1 if n.name in g.selected else 0]
        w, b = m.weight(n, self.mats)
        return F.linear(x, w, b)

    def attention(self, args, kwargs):
        m = self.model
        q, k, v = args[:3]
        kk, ki = self.mats["k"]
        q, k = ops._transform(q, ki), ops._transform(k, kk)
        if m.kv_bits < 16:
            k = fake_quant_act(k, m.kv_bits, m.kv_sym)
            v = fake_quant_act(v, m.kv_bits, m.kv_sym)
        return ops.EAGER[ops.ATTENTION](q, k, v, *args[3:], **kwargs)
