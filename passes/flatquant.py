"""flatquant: learned affine transforms + clipping for W4A4 (FlatQuant, Sun et al., 2024).

Per group of linears sharing one input, a learnable invertible transform ``P = P1 (x) P2``
(Kronecker product of two small matrices, ``n1 * n2 = in_features``, ``n1 ~ n2``: 256 = 16 x 16,
384 = 16 x 24) and a per-channel scale ``s`` make the activation easy to quantize::

    y = Q_a((x / s) P) . Q_w((W s) P^-T)^T          (= x W^T in float)

with learnable clipping: weights per output row (``sigmoid(logit) * max`` and ``* min``) and
activations per tensor (the dynamic per-token range shrunk by ``sigmoid(logit)``), logits
initialised at 4 (0.982). ``s`` starts SmoothQuant-style, ``max|x|^alpha / max|W|^(1 - alpha)``
(alpha 0.3); the matrices start as random orthogonal ones (seeded).

Where the transforms go (per decoder layer)::

    input_norm -> q, k, v     1/s folded into the norm weight; P online (`ptqc.transform` node
                              before q/k/v); P^-T and s folded into q/k/v's columns
    post_norm  -> gate, up    the same with the post-attention norm
    act(gate)*up -> down      1/s folded into up_proj's rows (and bias); P online before down
    attention -> o_proj       P = O (x) V over (heads, head_dim): the per-head V (D x D) is folded
                              into v_proj's output rows (and bias) -- it commutes with attention,
                              is the same for every head so it is exact under GQA, and costs
                              nothing at run time; the head-mixing O (H x H) cannot pass through
                              attention (each head has its own attention weights), so it stays
                              online (an H x H matmul per token: negligible). o_proj's columns
                              get O^-T (x) V^-T. No per-channel scale here (as in FlatQuant: V
                              subsumes a per-head-dim scale).
    q, k (after RoPE)         k_transform: k <- k K, q <- q K^-T (D x D, online) so that the K
                              cache the `kv` pass quantizes afterwards is flat; trained only if
                              `kv_bits` < 16 simulates that cache quantization (per token and KV
                              head, like `kv:k=head`); otherwise it stays a random rotation.

Training: decoder layer by decoder layer, on the float model's layer inputs (FlatQuant's
convention), AdamW (clips at 10x lr, cosine schedule to lr/1000) on the MSE between the
quantized layer's output and the float layer's output, ``epochs`` passes over the calibration
batches (the calibration batch size). Fake quantizers use a straight-through estimator on the
rounding; gradients reach the clip logits through the scales. The training interpreter runs
the layer segment's nodes with :data:`ptqc.ops.EAGER` and the learnable pieces substituted, and
its forward values equal the rewritten graph's.

After training the graph gets the transform nodes, one dynamic per-token ``quantize_act`` node
(``a_bits``, learned clip) per transformed input (shared by q/k/v and by gate/up), and
(``quantize=true``) per-channel (or ``w_group``) weight codes from the clipped transformed weights
(shared quantizer + ``set_quantized_weight``); ``quantize=false`` leaves clipped transformed
float weights for a later weight pass (``flatquant:quantize=false,gptq:group=0,sym=true``).

``auto=N``: after training, layers whose final loss (relative: MSE / mean square of the float
output, so depth does not dominate) is an outlier by median + 3 x 1.4826 x MAD
(:func:`ptqc.diagnose.outliers`) are re-trained from scratch with N x epochs; the better run is
kept. Per-layer ``lr``/``epochs`` also come from recipe overrides (the options of the layer's
first selected linear).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ptqc import ops, quant
from ptqc.calib import LayerRunner, calibration_batches, split
from ptqc.errors import PtqcError
from ptqc.ir import info, is_op
from ptqc.passes.act_quant import insert_quantizer
from ptqc.passes.smooth import smooth_scale
from ptqc.patterns import TRANSPARENT, producer_linear
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import in_features, select_linears, set_quantized_weight

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


# ---- the plan: which groups of linears get which transform ----------------------------------
@dataclass
class Group:
    gid: str  # key of its parameters, e.g. "qkv"
    kind: str  # "norm" (qkv, gate/up), "down" (scale folded into the producer linear), "o", "online"
    module: str  # module path of the transform, e.g. model.layers.0.self_attn.qkv_transform
    src: fx.Node  # the value the linears read
    lins: list  # every linear reading src
    selected: dict  # linear name -> options (quantized ones)
    prev: fx.Node | None  # where 1/s folds: the norm, or the producing linear (up_proj); None: no scale
    dims: tuple  # Kronecker factors (o: heads, head_dim)
    a_opts: object = None  # options of the activation quantizer (None: float input)
    v_lin: fx.Node | None = None  # o: the v_proj whose output rows get the per-head transform


@dataclass
class LayerPlan:
    layer: int
    opts: object  # options of the layer's first selected linear (epochs, lr, alpha, clip)
    groups: list
    attn: fx.Node | None = None  # attention node of the K transform
    head_dim: int = 0

    def linears(self) -> list:
        """Every linear whose weights change: the groups', v_proj (o's per-head fold), up_proj (down's scale)."""
        out = [n for g in self.groups for n in g.lins]
        extra = [g.v_lin for g in self.groups] + [g.prev for g in self.groups if is_op(g.prev, ops.LINEAR)]
        return out + [n for n in dict.fromkeys(extra) if n is not None and n not in out]


def _module_parent(m: str) -> str:
    return m.rsplit(".", 1)[0] if "." in m else m


def _only_feeds(node: fx.Node, target: fx.Node, arg: int) -> bool:
    """Does ``node``'s value reach nothing but ``target.args[arg]`` (through shape ops)?"""
    users = list(node.users)
    if len(users) != 1:
        return False
    u = users[0]
    if u is target:
        return target.args[arg] is node and list(target.args).count(node) == 1
    return u.op == "call_function" and u.target in TRANSPARENT and u.args[0] is node and _only_feeds(u, target, arg)


# ---- one layer's learnable model --------------------------------------------------------------
class LayerModel:
    """The parameters of one layer and a differentiable interpreter over its segment."""

    def __init__(self, qm, plan: LayerPlan, seg, weights: dict, device, *, seed: int = 0, stats=None,
                 kv_bits: int = 16, kv_sym: bool = False, params: dict | None = None):
        self.qm, self.plan, self.seg, self.weights, self.device = qm, plan, seg, weights, device
        self.kv_bits, self.kv_sym = kv_bits, kv_sym
        self.group_of = {n.name: g for g in plan.groups for n in g.lins}
        self.v_group = {g.v_lin.name: g for g in plan.groups if g.v_lin is not None}
        self.prev_of = {g.prev.name: g for g in plan.groups if g.prev is not None}  # norm / up -> group
        self.rewritten = {n.name for n in plan.linears()}
        self.specs = {}
        for g in plan.groups:
            for name, mo in g.selected.items():
                if mo.w_bits < 16:
                    self.specs[name] = quant.QuantSpec(mo.w_bits, mo.w_group, mo.w_sym)
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
                    out = self.weights[self._lin(name).args[1].target].shape[0]
                    self.p[f"{name}.wmax"] = torch.full((out, 1), CLIP_INIT, device=dev)
                    self.p[f"{name}.wmin"] = torch.full((out, 1), CLIP_INIT, device=dev)
        if self.plan.attn is not None:
            self.p["k.matrix"] = init_matrix(self.plan.head_dim, gen).to(dev)

    def _lin(self, name: str) -> fx.Node:
        for n in self.plan.linears():
            if n.name == name:
                return n
        raise KeyError(name)

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

    # -- forward --
    def interpret(self, state: dict, step=None, hook=None) -> dict:
        """Run the layer segment's nodes on one batch's state with the differentiable ops of
        ``ops.EAGER``. ``step(n, args, kwargs)`` may compute a node itself (``NotImplemented``: the
        plain op); ``hook(n, y)`` sees every value. Returns all values by node name."""
        env = dict(state)

        def val(a):
            return self.weights[a.target] if a.op == "get_attr" else env[a.name]

        for n in self.seg.nodes:
            args = fx.node.map_arg(n.args, val)
            kwargs = fx.node.map_arg(n.kwargs, val)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": self.device}
            y = step(n, args, kwargs) if step is not None else NotImplemented
            if y is NotImplemented:
                y = ops.EAGER.get(n.target, n.target)(*args, **kwargs)
            env[n.name] = y
            if hook is not None:
                hook(n, y)
        return env

    def forward(self, state: dict, mats: dict | None = None) -> dict:
        """Run the layer segment on one batch's state with the learnable pieces substituted;
        returns the values it produces for later segments."""
        mats = self.matrices() if mats is None else mats
        inputs: dict = {}

        def step(n, args, kwargs):
            if n.name in self.rewritten:
                x = args[0]
                g = self.group_of.get(n.name)
                if g is not None:
                    if g.gid not in inputs:
                        a, b = mats[g.gid][:2]
                        if g.kind == "o":
                            b = torch.eye(b.shape[0], device=self.device)
                        t = ops._transform(x, a, b)
                        tq = t
                        if g.a_opts is not None:
                            tq = fake_quant_act(t, g.a_opts.a_bits, g.a_opts.a_sym, self.p.get(f"{g.gid}.act_clip"))
                        inputs[g.gid] = (t, tq)
                    x = inputs[g.gid][1 if n.name in g.selected else 0]
                w, b = self.weight(n, mats)
                return F.linear(x, w, b)
            if n.name in self.prev_of and is_op(n, ops.RMS_NORM):
                args = (args[0], self.norm_weight(n, args[1]), *args[2:])
                return ops.EAGER[ops.RMS_NORM](*args, **kwargs)
            if n is self.plan.attn:
                q, k, v = args[:3]
                kk, ki = mats["k"]
                q, k = ops._transform(q, ki), ops._transform(k, kk)
                if self.kv_bits < 16:
                    k = fake_quant_act(k, self.kv_bits, self.kv_sym)
                    v = fake_quant_act(v, self.kv_bits, self.kv_sym)
                return ops.EAGER[ops.ATTENTION](q, k, v, *args[3:], **kwargs)
            return NotImplemented

        env = self.interpret(state, step)
        return {k: env[k] for k in self.outputs}


def _f32(v):
    return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _mse(out: dict, ref: dict) -> torch.Tensor:
    return sum(F.mse_loss(out[k].float(), ref[k].float()) for k in ref) / max(len(ref), 1)


# ---- the pass ---------------------------------------------------------------------------------
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

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        # what holds afterwards depends on the options (an instance attribute shadows the class one)
        self.provides = frozenset({"flatquant"} | ({"weight_quant"} if o.quantize and o.w_bits < 16 else set())
                                  | ({"act_quant"} if o.a_bits < 16 else set()))

    # -- planning --
    def plan(self, qm) -> dict[int, LayerPlan]:
        o = self.options
        selected = {}
        for n in select_linears(qm, o.include, o.exclude):
            mo = self.options_for(qm, n)
            if mo is None:
                continue
            m = info(n)
            if m.get("layer") is None:
                raise PtqcError(f"flatquant transforms decoder-layer linears only; {m['module']} is outside them: "
                                "exclude it (exclude=lm_head) and quantize it with rtn or w4a4")
            if mo.w_bits < 16:
                quant.QuantSpec(mo.w_bits, mo.w_group, mo.w_sym).check_fits(in_features(qm, n), m["module"])
            selected[n.name] = mo
        readers: dict = {}
        for n in qm.linears():
            if info(n).get("layer") is not None:
                readers.setdefault(n.args[0], []).append(n)
        cfg = qm.config
        heads = getattr(cfg, "num_attention_heads", 0)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        plans: dict[int, LayerPlan] = {}
        for src, lins in readers.items():
            sel = {n.name: selected[n.name] for n in lins if n.name in selected}
            if not sel:
                continue
            layer = info(lins[0])["layer"]
            roles = {info(n).get("role") for n in lins}
            parent = _module_parent(info(lins[0])["module"])
            n_in = in_features(qm, lins[0])
            prev, v_lin, dims = None, None, kron_dims(n_in)
            if is_op(src, ops.RMS_NORM) and set(src.users) == set(lins):
                kind, prev = "norm", src
                gid = ("qkv" if roles <= {"q", "k", "v"} else "up_gate" if roles <= {"gate", "up"}
                       else "norm_" + src.name)
            elif roles == {"down"} and len(lins) == 1:
                kind, gid = "online", "down"
                up = producer_linear(qm, lins[0])
                if (is_op(src, torch.ops.aten.mul.Tensor) and up is not None and len(src.users) == 1
                        and list(up.users) == [src] and info(up).get("layer") == layer):
                    kind, prev = "down", up
            elif roles == {"o"} and len(lins) == 1:
                kind, gid = "online", "o"
                v = producer_linear(qm, lins[0])
                attn = _skip_to(src)
                d = getattr(cfg, "head_dim", None) or (n_in // heads if heads else 0)
                if (v is not None and is_op(attn, ops.ATTENTION) and heads and d and heads * d == n_in
                        and info(v).get("layer") == layer and _only_feeds(v, attn, 2)
                        and qm.store.spec(v.args[1].target)[0][0] == kv_heads * d):
                    kind, v_lin, dims = "o", v, (heads, d)
            else:
                kind, gid = "online", f"online_{src.name}"
            a_opts = next(iter(sel.values()))
            pl = plans.get(layer)
            if pl is None:
                pl = plans[layer] = LayerPlan(layer, None, [])
            gname = {"qkv": "qkv_transform", "up_gate": "up_gate_transform", "down": "down_transform",
                     "o": "o_transform"}.get(gid, f"{gid}_transform")
            pl.groups.append(Group(gid, kind, f"{parent}.{gname}", src, lins, sel, prev, dims,
                                   a_opts if a_opts.a_bits < 16 else None, v_lin))
        order = {n.name: i for i, n in enumerate(qm.graph.nodes)}
        for layer, pl in plans.items():
            firsts = sorted((n for g in pl.groups for n in g.lins if n.name in selected), key=lambda n: order[n.name])
            pl.opts = selected[firsts[0].name]
            if pl.opts.k_transform:
                attn = [n for n in qm.nodes(ops.ATTENTION, layer=layer)]
                d = (attn[0].args[0].meta.get("shape") or [None])[-1] if len(attn) == 1 else None
                d = d if isinstance(d, int) else getattr(cfg, "head_dim", None) or (
                    getattr(cfg, "hidden_size", 0) // heads if heads else 0)
                if len(attn) == 1 and d:
                    pl.attn, pl.head_dim = attn[0], int(d)
        return dict(sorted(plans.items()))

    # -- training --
    def _layer_inputs_stats(self, model: LayerModel, plan: LayerPlan, states):
        """Float outputs (targets) of the layer and the per-channel max |x| of each scaled group's input."""
        stats: dict = {}
        targets = []
        srcs = {g.src.name: g.gid for g in plan.groups if g.prev is not None}
        def record(n, y):  # the per-channel max |x| of each scaled group's input
            if n.name in srcs:
                m = y.detach().reshape(-1, y.shape[-1]).abs().amax(0).float()
                gid = srcs[n.name]
                stats[gid] = m if gid not in stats else torch.maximum(stats[gid], m)

        with torch.no_grad():
            for st in states:
                env = model.interpret(st, hook=record)  # the float run
                targets.append({k: env[k].detach() for k in model.outputs})
        return targets, stats

    def _evaluate(self, model: LayerModel, states, targets) -> float:
        with torch.no_grad():
            mats = model.matrices()
            return sum(_mse(model.forward(st, mats), t).item() for st, t in zip(states, targets)) / len(states)

    def _train_layer(self, qm, ctx, plan: LayerPlan, seg, states, *, epochs: int) -> tuple[dict, dict]:
        o, lo = self.options, plan.opts
        dev = ctx.device
        weights = {name: _f32(qm.store[name]).to(dev) for name in seg.weights}
        states = [{k: _f32(v) for k, v in st.items()} for st in states]
        probe = LayerModel(qm, plan, seg, weights, dev, params={})
        targets, stats = self._layer_inputs_stats(probe, plan, states)
        model = LayerModel(qm, plan, seg, weights, dev, seed=o.seed, stats=stats, kv_bits=o.kv_bits, kv_sym=o.kv_sym)
        t0 = time.perf_counter()
        power = sum(sum(t[k].float().pow(2).mean().item() for k in t) / max(len(t), 1) for t in targets) / len(targets)
        loss_init = self._evaluate(model, states, targets)
        groups = model.param_groups(lo.lr)
        epoch_losses = []
        quantizing = bool(model.specs) or any(g.a_opts is not None for g in plan.groups) or o.kv_bits < 16
        trainable = quantizing and loss_init > 0 and epochs > 0 and any(gr["params"] for gr in groups)
        if trainable:
            opt = torch.optim.AdamW(groups, lr=lo.lr)
            steps = epochs * len(states)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lo.lr * 1e-3)
            for ep in range(epochs):
                total = 0.0
                for st, tgt in zip(states, targets):
                    loss = _mse(model.forward(st), tgt)
                    if not torch.isfinite(loss):
                        raise PtqcError(f"flatquant: non-finite loss in layer {plan.layer} at epoch {ep}; lower its lr "
                                        f"(recipe overrides: {{match: \"layers.{plan.layer}.*\", lr: ...}})")
                    total += loss.item()
                    opt.zero_grad(set_to_none=True)
                    if loss.item() > 0:
                        (loss / loss.detach()).backward()  # FlatQuant's normalised step
                        opt.step()
                    sched.step()
                epoch_losses.append(total / len(states))
        for t in model.p.values():
            t.requires_grad_(False)
        loss_end = self._evaluate(model, states, targets) if trainable else loss_init
        qm.store.release(seg.weights)
        rec = {"layer": plan.layer, "loss_init": _r(loss_init),
               "loss_epoch0": _r(epoch_losses[0]) if epoch_losses else None,
               "loss_end": _r(loss_end), "rel_loss_end": _r(loss_end / power if power > 0 else 0.0),
               "epoch_losses": [_r(v) for v in epoch_losses], "seconds": round(time.perf_counter() - t0, 3),
               "options": {"epochs": epochs, "lr": lo.lr, "alpha": lo.alpha, "clip": lo.clip, "w_bits": lo.w_bits,
                           "a_bits": lo.a_bits}}
        return model.export(), rec

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        plans = self.plan(qm)
        if not plans:
            return PassResult(changed=False, summary={"layers": []})
        ids = ctx.calibration_ids(qm)
        batches = calibration_batches(ids, ctx.calib_batch_size)
        params: dict[int, dict] = {}
        records: dict[int, dict] = {}
        self._sweep(qm, ctx, plans, batches, params, records, {i: plans[i].opts.epochs for i in plans}, "flatquant")
        auto = None
        if o.auto > 0:
            from ptqc.diagnose import outliers

            scores = {i: r["rel_loss_end"] for i, r in records.items()}
            flagged, st = outliers(scores)
            auto = {"flagged": sorted(flagged), "rule": "rel_loss_end > median + 3 * 1.4826 * MAD",
                    **{k: (_r(v) if v is not None else None) for k, v in st.items()}, "retrained": []}
            if flagged:
                ctx.info(f"flatquant auto: re-training layers {sorted(flagged)} with {o.auto}x epochs")
                new_p, new_r = {}, {}
                self._sweep(qm, ctx, {i: plans[i] for i in flagged}, batches, new_p, new_r,
                            {i: plans[i].opts.epochs * o.auto for i in flagged}, "flatquant auto")
                for i in sorted(flagged):
                    better = new_r[i]["loss_end"] < records[i]["loss_end"]
                    auto["retrained"].append({"layer": i, "epochs": new_r[i]["options"]["epochs"],
                                              "loss_end_before": records[i]["loss_end"],
                                              "loss_end_after": new_r[i]["loss_end"], "kept": "retrained" if better
                                              else "first"})
                    records[i]["retrain"] = new_r[i]
                    if better:
                        params[i] = new_p[i]
        # rewrite the graph (nothing changed until here: training saw the float graph throughout)
        counts = {"transforms": 0, "act_quant": 0, "weights_quantized": 0}
        for i, pl in plans.items():
            self._apply(qm, ctx, pl, params[i], counts)
        summary = {"samples": int(ids.shape[0]), "tokens": int(ids.numel()), "batch_size": ctx.calib_batch_size,
                   "propagate": "float", **counts, "quantized": bool(o.quantize and o.w_bits < 16),
                   "layers": [records[i] for i in sorted(records)]}
        if auto is not None:
            summary["auto"] = auto
        return PassResult(changed=True, summary=summary)

    def _sweep(self, qm, ctx, plans, batches, params, records, epochs, desc) -> None:
        """Run the float model layer by layer, training the planned layers on their float inputs."""
        runner = LayerRunner(qm, batches, device=ctx.device)
        runner.run_prefix()
        last = max(plans)
        for i in ctx.progress(range(last + 1), desc=desc, unit="layer"):
            if i in plans:
                seg = {s.key: s for s in split(qm.graph)}[f"layer.{i}"]
                params[i], records[i] = self._train_layer(qm, ctx, plans[i], seg, runner.state, epochs=epochs[i])
                r = records[i]
                ctx.info(f"flatquant layer {i}: loss {r['loss_init']:.4g} -> {r['loss_end']:.4g} "
                         f"({epochs[i]} epochs, {r['seconds']:.1f} s)")
            if i < last:
                runner.run_layer(i)
        qm.store.release()

    # -- graph rewrite --
    def _apply(self, qm, ctx, pl: LayerPlan, params: dict, counts: dict) -> None:
        o = self.options
        g_ = qm.graph
        seg = {s.key: s for s in split(qm.graph)}[f"layer.{pl.layer}"]
        weights = {name: _f32(qm.store[name]) for name in seg.weights}
        # the rewrite is computed where the weight store keeps its tensors (host memory)
        model = LayerModel(qm, pl, seg, weights, torch.device("cpu"), params=params)
        with torch.no_grad():
            mats = model.matrices()
            new_w = {n.name: model.weight(n, mats, fake_quant=False) for n in pl.linears()}
            norms = {g.prev.name: model.norm_weight(g.prev, weights[g.prev.args[1].target])
                     for g in pl.groups if g.prev is not None and is_op(g.prev, ops.RMS_NORM)}
        for g in pl.groups:
            if g.prev is not None and is_op(g.prev, ops.RMS_NORM):
                qm.store[g.prev.args[1].target] = norms[g.prev.name].to(qm.dtype)
        for n in pl.linears():
            w, b = new_w[n.name]
            spec = model.specs.get(n.name)
            b_node = n.args[2] if len(n.args) > 2 else None
            if isinstance(b_node, fx.Node) and b is not None:
                qm.store[b_node.target] = b.to(qm.dtype)
            g = model.group_of.get(n.name)
            if spec is not None and o.quantize:
                scale, zp = quant.compute_qparams(w, spec)
                set_quantized_weight(qm, n, spec, quant.quantize(w, scale, zp, spec), scale, zp, "flatquant",
                                     {"transform": g.module if g else None,
                                      "clipped": f"{n.name}.wmax" in params})
                counts["weights_quantized"] += 1
            else:
                qm.store[n.args[1].target] = w.to(qm.dtype)
        order = {n.name: i for i, n in enumerate(qm.graph.nodes)}
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
        if pl.attn is not None:
            kk, ki = mats["k"]
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
            counts["transforms"] += 2
        qm.store.release(seg.weights)


def _skip_to(n):
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in TRANSPARENT:
        n = n.args[0]
    return n


def _r(v: float) -> float:
    return float(f"{v:.6g}")


def plot_losses(summary: dict, path) -> None:
    """A PNG of the per-epoch training loss of every layer (dashed: auto re-training)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    n = max(len(summary.get("layers", [])), 1)
    import matplotlib.cm as cm

    for j, rec in enumerate(summary.get("layers", [])):
        color = cm.viridis(j / max(n - 1, 1))
        ys = rec.get("epoch_losses") or []
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, color=color, marker="." if len(ys) < 30 else None,
                    label=f"layer {rec['layer']}")
        re = (rec.get("retrain") or {}).get("epoch_losses") or []
        if re:
            ax.plot(range(1, len(re) + 1), re, color=color, linestyle="--", label=f"layer {rec['layer']} (auto)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer output MSE (training mean)")
    ax.set_title("flatquant: per-layer training loss")
    if summary.get("layers"):
        ax.legend(fontsize=7, ncol=2 if n > 8 else 1)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


__all__ = ["FlatQuant", "plot_losses", "kron_dims", "fake_quant_act", "fake_quant_weight", "clip_weight"]
