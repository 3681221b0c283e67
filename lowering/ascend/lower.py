"""Lowering a quantized ptqc graph to Ascend kernels (``ptqc_npu::*``, see ops.py): the rules in
:data:`RULES` are the lowering.

Phases run in the order of the table. In each, every node of the graph as it was when the phase
began is offered to the phase's rules in order; the first whose pattern matches and whose ``when``
holds takes it: its ``check`` returns why no kernel takes the node (the lowering stops with that
reason, or with ``fallback=true`` leaves it a float fake-quant op), else ``rewrite`` replaces the
match. ``fuse=false`` turns the fusions off (one quantization kernel per quantize_act node: the
naive lowering, kept for comparison).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ptqc.errors import PtqcError
from ptqc.ir import QModel, info
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend import rules_attention as A
from ptqc.lowering.ascend import rules_linear as L
from ptqc.lowering.ascend import rules_moe as M
from ptqc.lowering.ascend import rules_norm as N
from ptqc.patterns import Pat

QUANT_KERNELS = N.QUANT_KERNELS  # standalone quantization kernels
FUSED_QUANT = (npu.ADD_RMS_NORM_DYNAMIC_QUANT, npu.ADD_RMS_NORM_QUANT, npu.SWIGLU_QUANT)
INT4_QUANT_KERNELS = (npu.DYNAMIC_QUANT_INT4,)  # standalone too; kept out of QUANT_KERNELS (no int4 norm fusion)
TRANSFORM_QUANT = (npu.KRONECKER_QUANT, npu.ROTATE_QUANT)  # transform + quantization: counted as fused_quant
ATTENTION_MODES = ("fia", "softmax", "add_softmax", "keep")
ATTENTION_KERNELS = (npu.FUSED_INFER_ATTENTION_SCORE, npu.SCALED_MASKED_SOFTMAX, npu.DROPOUT_WITH_ADD_SOFTMAX)
MOE_KERNELS = {npu.MOE_GATING_TOP_K_SOFTMAX: "moe_gating", npu.MOE_GATING_TOP_K: "moe_gating",
               npu.MOE_INIT_ROUTING_V2: "moe_init_routing", npu.GROUPED_MATMUL: "grouped_matmul",
               npu.MOE_FINALIZE_ROUTING: "moe_finalize"}
MOE_COUNTS = ("moe_gating", "moe_init_routing", "grouped_matmul", "moe_dynamic_quant", "moe_finalize")  # MoE layers
ROLE_COUNTED = {**dict.fromkeys(("k_cache_quant", "v_cache_quant", "latent_cache_quant", "rope_key_cache_quant"),
                                 "cache_quant"),  # quantization kernels by role
                "moe_dynamic_quant": "moe_dynamic_quant"}
COUNTED = {**dict.fromkeys(QUANT_KERNELS + INT4_QUANT_KERNELS, "standalone_quant"),  # kernel -> kernel_counts key
           **dict.fromkeys(FUSED_QUANT + TRANSFORM_QUANT, "fused_quant"),
           **dict.fromkeys(ATTENTION_KERNELS, "attention"), npu.QUANT_MATMUL: "quant_matmul", npu.WEIGHT_QUANT_BATCHMATMUL: "weight_quant_matmul",
           **MOE_KERNELS, L.npu_quant.PD_MIX_QUANT: "standalone_quant", L.npu_mx.DYNAMIC_MX_QUANT: "standalone_quant",
           L.npu_mx.MX_QUANT_MATMUL: "quant_matmul"}


@dataclass(frozen=True)
class Rule:
    """``pattern`` binds names in the graph; ``when(lw, bindings)`` (options, constants) says whether
    the rule applies; ``check(lw, bindings)`` returns why the kernels cannot take it, or None;
    ``rewrite(lw, bindings)`` replaces the match by ``kernels`` (torch_npu names)."""

    phase: str
    name: str
    doc: str
    kernels: tuple[str, ...]
    pattern: Pat
    rewrite: Callable | None
    check: Callable | None = None
    when: Callable | None = None


FUSE = lambda lw, m: lw.fuse  # noqa: E731
QMM = "npu_quant_matmul"
RULES = (  # phase, name, doc, kernels, pattern, rewrite, check, when
    Rule("attention", "attention_mla", "MLA attention (qk head dim != v head dim): kept float, reason in "
         "the summary's kept list", (), A.MLA, A.keep_mla),
    Rule("attention", "attention_kv8", "attention over static int8 K and V: the C8 cache write ([B, S, KV_N * D]), "
         "fused attention with antiquant scale/offset", ("npu_quantize", "npu_fused_infer_attention_score"),
         A.KV8, A.rewrite_fia, A.check_fia),
    Rule("attention", "attention_fia", "float attention (attention=fia): fused attention, BNSD, GQA, causal or "
         "band mask", ("npu_fused_infer_attention_score",), A.FLOAT, A.rewrite_fia, A.check_fia,
         lambda lw, m: lw.attention == "fia"),
    Rule("attention", "attention_softmax", "causal float attention (attention=softmax|add_softmax): q k^T, "
         "a masked softmax kernel, @ v", ("npu_scaled_masked_softmax", "npu_dropout_with_add_softmax"),
         A.FLOAT, A.rewrite_softmax, A.check_softmax, lambda lw, m: lw.attention in ("softmax", "add_softmax")),
    *(Rule("moe", *r) for r in M.RULES),
    Rule("act_quant", "mx", "W8A8_MXFP8 / W4A4_MXFP4: MX quantization per block of 32 (E8M0 scales), MX matmuls",
         ("npu_dynamic_mx_quant", QMM), L.MX, L.rewrite_mx, L.check_mx),
    Rule("act_quant", "w8a8_mix", "W8A8_MIX: dynamic per-token quantization at prefill, the static scale at "
         "decode, per-token matmuls", ("npu_dynamic_quant", "npu_quantize", QMM), L.INT8_MIX, L.rewrite_int8_mix,
         L.check_int8_mix),
    Rule("act_quant", "w4a4_transform", "int4 per-token quantization of a rotation / FlatQuant transform (with its "
         "clip ratio) in one kernel", ("npu_kronecker_quant", "npu_rotate_quant", QMM),
         L.INT4_TRANSFORM, L.rewrite_int4, L.check_int4, L.transform_fits),
    Rule("act_quant", "w4a4_dynamic", "W4A4: int4 per-token quantization, int4 matmuls (weights packed 8 per int32)",
         ("npu_dynamic_quant", QMM), L.INT4_DYNAMIC, L.rewrite_int4, L.check_int4),
    Rule("act_quant", "w4a8_weight_only", "W4A8 dynamic as vllm-ascend serves it: float activations, int4 weights "
         "left to weight_only", (), L.INT8_DYNAMIC, L.rewrite_w4a8_weight_only, None, L.is_w4a8),
    Rule("act_quant", "w8a8_dynamic_smooth", "W8A8 dynamic of x * c (smooth:fold=false): c is the kernel's "
         "smooth_scales", ("npu_dynamic_quant", QMM), L.INT8_DYNAMIC_SMOOTH, L.rewrite_int8_dynamic, L.check_int8,
         FUSE),
    Rule("act_quant", "w8a8_dynamic", "W8A8 dynamic: one per-token quantization per quantize_act node, "
         "matmuls with pertoken_scale", ("npu_dynamic_quant", QMM), L.INT8_DYNAMIC, L.rewrite_int8_dynamic,
         L.check_int8),
    Rule("act_quant", "w8a8_static", "W8A8 static: per-tensor quantization, matmuls with an int64 deq_scale (19 bits) "
         "and int32 quant_bias", ("npu_quantize", QMM), L.INT8_STATIC, L.rewrite_int8_static, L.check_int8,
         L.static_scale),
    Rule("act_quant", "act_quant_unsupported", "any other activation quantization: refused", (), L.ACT_QUANT, None,
         lambda lw, m: L.ACT_REASON),
    Rule("weight_only", "weight_only", "W8A16 / W4A16, per channel or group: weight-quant matmul",
         ("npu_weight_quant_batchmatmul",), L.WEIGHT_ONLY, L.rewrite_weight_only, L.check_weight_only),
    Rule("swiglu", "swiglu_quant", "gate/up sharing one dynamic quantization as one matmul, then SwiGLU + quant "
         "for down_proj", (QMM, "npu_swiglu_quant"), L.SWIGLU, L.rewrite_swiglu, None, L.swiglu_fits),
    Rule("transform", "float_transform", "a transform no kernel took: float matmuls x a, or a^T X b",
         (), L.FLOAT_TRANSFORM, L.rewrite_transform),
    Rule("norm", "add_rms_norm_dynamic_quant", "residual add + RMSNorm + the dynamic quantization after it",
         ("npu_add_rms_norm_dynamic_quant",), N.ADD_NORM_DYNAMIC_QUANT, N.rewrite_add_norm_dynamic_quant, None, FUSE),
    Rule("norm", "add_rms_norm_quant", "residual add + RMSNorm + the static quantization after it",
         ("npu_add_rms_norm_quant",), N.ADD_NORM_QUANT, N.rewrite_add_norm_quant, None, FUSE),
    Rule("norm", "add_rms_norm", "residual add + RMSNorm", ("npu_add_rms_norm",), N.ADD_NORM, N.rewrite_add_norm,
         None, FUSE),
    Rule("norm", "rms_norm", "RMSNorm (Gemma's 1 + w folded into the weight)", ("npu_rms_norm",), N.NORM,
         N.rewrite_norm),
    Rule("norm", "layer_norm", "LayerNorm: aten.layer_norm (torch_npu's LayerNorm kernel; no fused add/quant "
         "variant exists)", (), N.LAYER_NORM, N.rewrite_layer_norm),
)
PHASES = tuple(dict.fromkeys(r.phase for r in RULES))


class Lowering:
    """One lowering run: the model, the options the rules read, and what they build the graph with."""

    def __init__(self, qm: QModel, fuse: bool = True, truncate: bool = True, fallback: bool = False,
                 int_bias: bool = True, attention: str = "fia", seqlen: int = 0):
        self.qm, self.g, self.dtype = qm, qm.graph, qm.dtype
        self.fuse, self.truncate, self.fallback, self.int_bias = fuse, truncate, fallback, int_bias
        if attention not in ATTENTION_MODES:
            raise PtqcError(f"attention={attention!r} is not one of {', '.join(ATTENTION_MODES)}")
        self.attention, self.seqlen = attention, seqlen
        self.score_masks: dict = {}  # causal masks of the softmax kernels, shared across layers
        self.refused: list[str] = []
        self.kept: list[str] = []  # nodes left float by design, with the reason
        self.fired: Counter = Counter()  # rule name -> matches it rewrote or refused

    def refuse(self, node: fx.Node, why: str) -> None:
        msg = f"{info(node).get('module')}: {why}"
        if not self.fallback:
            raise PtqcError(f"cannot lower {msg} to Ascend kernels; allow fallback=true to keep it as a float op")
        self.refused.append(msg)

    def apply(self, rules, node: fx.Node) -> Rule | None:
        """Offer ``node`` to ``rules`` in order; the first that applies refuses or rewrites it."""
        for rule in rules:
            m = rule.pattern.match(node)
            if m is None or (rule.when is not None and not rule.when(self, m)):
                continue
            why = rule.check(self, m) if rule.check is not None else None
            self.fired[rule.name] += 1
            if why:
                self.refuse(node, why)
            else:
                rule.rewrite(self, m)
            return rule
        return None

    def run_phase(self, phase: str) -> None:
        rules = [r for r in RULES if r.phase == phase]
        for node in list(self.g.nodes):
            if not getattr(node, "_erased", False):
                self.apply(rules, node)

    def run(self) -> dict:
        for phase in PHASES:
            self.run_phase(phase)
        self.g.eliminate_dead_code()
        return {"refused": self.refused, **({"kept": self.kept} if self.kept else {}),
                "kernels": kernel_counts(self.qm)}

    # ---- building the lowered graph (used by the rules) ----------------------------------------------
    def new(self, target, args, like: fx.Node, role=None, module=None) -> fx.Node:
        """A call node carrying ``like``'s module, layer and role (unless given)."""
        n = self.g.call_function(target, tuple(args))
        m = info(like)
        info(n).update({"module": module or m.get("module"), "layer": m.get("layer"), "role": role or m.get("role")})
        return n

    def const(self, name: str, t: torch.Tensor) -> fx.Node:
        self.qm.store[name] = t.contiguous()
        return self.g.get_attr(name)

    def value(self, n: fx.Node) -> torch.Tensor:
        return self.qm.store[n.target]


def kernel_counts(qm: QModel) -> dict:
    """Per decoder layer: standalone quantization kernels (int8 and int4 dynamic_quant, quantize),
    fused norm/activation/transform + quant kernels (kronecker_quant and rotate_quant count here),
    quantized matmuls (the numbers ``ptqc inspect --ops`` shows); ``float_transform`` (transforms
    run as plain float matmuls) and the MoE kernels (``moe_gating``, ``moe_init_routing``,
    ``grouped_matmul``, ``moe_dynamic_quant``, ``moe_finalize``) appear only in layers that have them."""
    out: dict = {}
    for n in qm.graph.nodes:
        if n.op != "call_function":
            continue
        layer = info(n).get("layer")
        if layer is None:
            continue
        c = out.setdefault(layer, {"standalone_quant": 0, "fused_quant": 0, "quant_matmul": 0, "weight_quant_matmul": 0,
                                   "cache_quant": 0, "attention": 0})
        role = info(n).get("role")
        if n.target in QUANT_KERNELS and role in ROLE_COUNTED:
            key = ROLE_COUNTED[role]  # K/V cache writes (C8); MoE expert-input quantization
        else:  # float_transform: a transform run as plain float matmuls (key only when > 0)
            key = COUNTED.get(n.target) or ("float_transform" if role == "float_transform" else None)
        if key is not None:
            c[key] = c.get(key, 0) + 1
    return dict(sorted(out.items()))


def lower(qm: QModel, fuse: bool = True, truncate: bool = True, fallback: bool = False, int_bias: bool = True,
          attention: str = "fia", seqlen: int = 0) -> dict:
    return Lowering(qm, fuse, truncate, fallback, int_bias, attention, seqlen).run()


def is_lowered(qm: QModel) -> bool:
    return any(str(n.target).startswith("ptqc_npu.") for n in qm.graph.nodes if n.op == "call_function")


def kernel_report(qm: QModel) -> list[dict]:
    """Quantization kernels per decoder layer: naive (one per quantized linear), shared (one per
    quantize_act node, ``fuse=false``), fused (``fuse=true``). A graph that is already lowered is
    reported as it is."""
    def lowered(c):  # what the fused lowering runs besides standalone quantization
        return {"fused_kernels": c.get("fused_quant", 0), "quant_matmul": c.get("quant_matmul", 0),
                "cache_quant": c.get("cache_quant", 0), "attention": c.get("attention", 0),
                "float_transform": c.get("float_transform", 0),
                **({k: c.get(k, 0) for k in MOE_COUNTS} if moe else {})}

    if is_lowered(qm):
        counts = kernel_counts(qm)
        moe = any(k in c for c in counts.values() for k in MOE_COUNTS)
        return [{"layer": k, "fused": c["standalone_quant"], **lowered(c)} for k, c in counts.items()]
    shared, fused = qm.clone(), qm.clone()
    lower(shared, fuse=False, fallback=True)
    lower(fused, fuse=True, fallback=True)
    s, f = kernel_counts(shared), kernel_counts(fused)
    moe = any(k in c for c in f.values() for k in MOE_COUNTS)
    return [{"layer": k, "naive": s[k]["quant_matmul"], "shared": s[k]["standalone_quant"],
             "fused": f.get(k, {}).get("standalone_quant", 0), **lowered(f.get(k, {}))} for k in s]
