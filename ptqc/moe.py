"""Mixture-of-experts blocks: how they are traced, named and stored.

transformers holds a block's experts fused as 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) and runs them in a data-dependent loop torch.export cannot
trace. :func:`swap_moe` replaces, on the meta model, each block's router by :class:`Router`
(an ordinary linear, then ``ptqc.moe_route``) and its experts by :class:`Experts`
(``ptqc.moe_experts`` on separate ``gate_proj`` / ``up_proj`` / ``down_proj`` stacks
[E, out, in]), so the graph reads router -> top-k -> experts -> combine.

Checkpoints hold one tensor per expert (``mlp.experts.3.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.3.w1.weight``). The graph names each stack like its experts' tensors
without the index (``mlp.experts.gate_proj.weight``, ``block_sparse_moe.experts.w1.weight``):
:func:`register_stacks` lets a weight store read a stack from the per-expert tensors (or from the
fused ``experts.gate_up_proj`` / ``experts.down_proj`` of checkpoints that keep them fused), and
:func:`expert_name` gives the per-expert name of each slice an artifact writes.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ptqc import ops
from ptqc.errors import PtqcError

# Router classes ptqc knows: how each scores and what it returns. Attributes of the router
# (top_k, norm_topk_prob, num_group, topk_group, routed_scaling_factor, e_score_correction_bias)
# give the rest. "norm": renormalize the top-k weights (None: the router's norm_topk_prob);
# "fp32": logits computed in float32; "fp32_weights": weights returned in float32.
ROUTERS = {
    "MixtralTopKRouter": {"scoring": "softmax", "norm": True, "fp32": False, "fp32_weights": True},
    "Qwen2MoeTopKRouter": {"scoring": "softmax", "norm": None, "fp32": False, "fp32_weights": False},
    "Qwen3MoeTopKRouter": {"scoring": "softmax", "norm": None, "fp32": False, "fp32_weights": False},
    "Glm4MoeTopkRouter": {"scoring": "sigmoid", "norm": None, "fp32": True, "fp32_weights": True},
    "DeepseekV3TopkRouter": {"scoring": "sigmoid", "norm": None, "fp32": True, "fp32_weights": True},
    "DeepseekV2TopkRouter": {"scoring": "softmax", "norm": False, "fp32": True, "fp32_weights": True},
}
# Per-expert projection names in checkpoints -> the role of their stack.
EXPERT_PROJS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)\.([^.]+)$")  # prefix, index, proj, leaf
_STACKED = re.compile(r"^(.*\.experts)\.([^.]+)\.([^.]+)$")  # prefix, proj, leaf


class Router(nn.Module):
    """A router as a linear (weight [E, H]) followed by ``ptqc.moe_route``: returns (logits,
    top-k weights, top-k ids) like transformers' routers."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None, route: dict, fp32: bool):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.register_buffer("e_score_correction_bias", bias)
        self.bias_ = bias is not None
        self.route, self.fp32 = route, fp32

    def forward(self, x):
        x = x.reshape(-1, self.weight.shape[1])
        logits = F.linear(x.float(), self.weight.float()) if self.fp32 else F.linear(x, self.weight)
        bias = self.e_score_correction_bias if self.bias_ else None
        w, ids = torch.ops.ptqc.moe_route(logits, bias, **self.route)
        return logits, w, ids


class _Stack(nn.Module):
    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t, requires_grad=False)


class Experts(nn.Module):
    """E experts as ``ptqc.moe_experts`` over stacks ``gate_proj``/``up_proj`` [E, I, H] and
    ``down_proj`` [E, H, I]."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: str):
        super().__init__()
        i = gate_up.shape[1] // 2
        self.gate_proj, self.up_proj = _Stack(gate_up[:, :i].clone()), _Stack(gate_up[:, i:].clone())
        self.down_proj = _Stack(down.clone())
        self.act = act

    def forward(self, x, ids, weights):
        return torch.ops.ptqc.moe_experts(x, weights, ids, self.gate_proj.weight, self.up_proj.weight,
                                          self.down_proj.weight, self.act)


def _route_of(router: nn.Module) -> tuple[dict, bool]:
    rule = ROUTERS.get(type(router).__name__)
    if rule is None:
        raise PtqcError(f"MoE router {type(router).__name__} is not known to ptqc "
                        f"(known: {', '.join(ROUTERS)}); add its rule to ptqc.moe.ROUTERS")
    norm = rule["norm"] if rule["norm"] is not None else bool(getattr(router, "norm_topk_prob", False))
    route = {"top_k": int(router.top_k), "scoring": rule["scoring"], "norm_topk_prob": norm,
             "n_group": int(getattr(router, "num_group", 1) or 1),
             "topk_group": int(getattr(router, "topk_group", 1) or 1),
             "scale": float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
             "weights_dtype": torch.float32 if rule["fp32_weights"] else None}
    return route, rule["fp32"]


def _check_experts(experts: nn.Module, act: str) -> None:
    name = type(experts).__name__
    odd = [a for a, ok in (("is_transposed", False), ("has_bias", False), ("is_concatenated", True),
                           ("has_gate", True)) if getattr(experts, a, ok) != ok]
    if odd:
        raise PtqcError(f"MoE experts {name} have a layout ptqc does not trace yet ({', '.join(odd)})")
    if act not in ops.MOE_ACTS:
        raise PtqcError(f"MoE experts {name} use activation {act!r}; ptqc knows {', '.join(ops.MOE_ACTS)}")


def _is_moe_block(m: nn.Module) -> bool:
    ex = getattr(m, "experts", None)
    return isinstance(getattr(m, "gate", None), nn.Module) and isinstance(ex, nn.Module) and \
        getattr(ex, "gate_up_proj", None) is not None and getattr(ex, "down_proj", None) is not None \
        and ex.gate_up_proj.dim() == 3


def swap_moe(model: nn.Module, act: str) -> int:
    """Replace the router and experts of every MoE block of ``model`` (in place); how many blocks."""
    blocks = [m for m in model.modules() if _is_moe_block(m)]
    for m in blocks:
        route, fp32 = _route_of(m.gate)
        _check_experts(m.experts, act)
        m.gate = Router(m.gate.weight, getattr(m.gate, "e_score_correction_bias", None), route, fp32)
        m.experts = Experts(m.experts.gate_up_proj.detach(), m.experts.down_proj.detach(), act)
    return len(blocks)


# ---- names ------------------------------------------------------------------------------------
def _renamings(model_type: str | None) -> list:
    """transformers' checkpoint -> model key renamings of this model type (e.g. Mixtral's
    ``.block_sparse_moe.`` -> ``.mlp.``); empty where it has none or no such API."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    return [t for t in (get_checkpoint_conversion_mapping(model_type) or []) if type(t) is WeightRenaming]


def _stacked(name: str) -> str | None:
    """``X.experts.3.P.weight`` -> ``X.experts.P.weight`` (None for other names)."""
    m = _PER_EXPERT.match(name)
    return f"{m[1]}.{m[3]}.{m[4]}" if m and m[3] in EXPERT_PROJS else None


def expert_name(stacked: str, e: int) -> str:
    """The name of expert ``e``'s slice of a stack: ``X.experts.P.leaf`` -> ``X.experts.e.P.leaf``."""
    m = _STACKED.match(stacked)
    if m is None:
        raise PtqcError(f"internal: {stacked!r} is not the name of an expert stack")
    return f"{m[1]}.{e}.{m[2]}.{m[3]}"


def checkpoint_names(keys, model_type: str | None) -> dict[str, str]:
    """{model name: checkpoint name} for the tensors whose names differ, expert stacks included:
    model ``X.experts.gate_proj.weight`` <- checkpoint ``Y.experts.w1.weight`` (stacked name of
    ``Y.experts.N.w1.weight``, with ``Y`` renamed to ``X`` by transformers' renamings)."""
    ren = _renamings(model_type)
    out = {}
    for key in keys:
        model_key = key
        for r in ren:
            model_key = r.rename_source_key(model_key)[0]
        ck, mk = _stacked(key), _stacked(model_key)
        if ck is not None and mk is not None:
            proj = _STACKED.match(mk)
            key, model_key = ck, f"{proj[1]}.{EXPERT_PROJS[proj[2]]}_proj.{proj[3]}"
        if key != model_key:
            out[model_key] = key
    return out


def expert_model_names(keys, model_type: str | None) -> dict[str, str]:
    """{checkpoint name: model-style name} of the per-expert tensors among ``keys`` whose names differ:
    Mixtral's ``block_sparse_moe.experts.3.w1.weight`` -> ``mlp.experts.3.gate_proj.weight`` (the names
    llm-compressor gives the per-expert linears of transformers' fused experts)."""
    ren, out = _renamings(model_type), {}
    for key in keys:
        m = _PER_EXPERT.match(key)
        if m is None or m[3] not in EXPERT_PROJS:
            continue
        mk = key
        for r in ren:
            mk = r.rename_source_key(mk)[0]
        mm = _PER_EXPERT.match(mk) or m
        model = f"{mm[1]}.{mm[2]}.{EXPERT_PROJS[m[3]]}_proj.{mm[4]}"
        if model != key:
            out[key] = model
    return out


def rename_to_checkpoint(g: fx.Graph, keys, model_type: str | None) -> None:
    """Name every weight of the graph as the checkpoint does (see :func:`checkpoint_names`)."""
    names = checkpoint_names(keys, model_type)
    for n in g.nodes:
        if n.op == "get_attr" and n.target in names:
            n.target = names[n.target]


def register_stacks(g: fx.Graph, store) -> None:
    """Let ``store`` read every expert stack the graph names but the store lacks from its
    per-expert tensors (experts 0, 1, ... as far as they go)."""
    for n in g.nodes:
        if n.op != "get_attr" or n.target in store or not _STACKED.match(n.target):
            continue
        parts = []
        while expert_name(n.target, len(parts)) in store:
            parts.append(expert_name(n.target, len(parts)))
        if parts:
            store.stacks[n.target] = parts
        else:
            _register_fused(n.target, store)


def _register_fused(stacked: str, store) -> None:
    """A fused checkpoint's stacks: ``X.experts.gate_proj.weight`` / ``up_proj.weight`` read as the
    halves of ``X.experts.gate_up_proj`` [E, 2I, H], ``down_proj.weight`` as ``X.experts.down_proj``."""
    m = _STACKED.match(stacked)
    if m is None or m[3] != "weight" or m[2] not in ("gate_proj", "up_proj", "down_proj"):
        return
    src = f"{m[1]}.{'down_proj' if m[2] == 'down_proj' else 'gate_up_proj'}"
    if src not in store or len(store.spec(src)[0]) != 3:
        return
    rows = store.spec(src)[0][1]
    store.slices[stacked] = (src, rows // 2 if m[2] == "up_proj" else 0, rows // 2 if m[2] == "gate_proj" else rows)


def stacked_weights(g: fx.Graph) -> set[str]:
    """Names of the [E, ...] tensors the experts read (float stacks, or codes and scales)."""
    out: set[str] = set()
    todo = [a for n in g.nodes if n.op == "call_function" and n.target == ops.MOE_EXPERTS
            for a in n.args[3:6] if isinstance(a, fx.Node)]
    while todo:
        a = todo.pop()
        if a.op == "get_attr":
            out.add(a.target)
        todo.extend(a.all_input_nodes)
    return out
