"""What some decoder families need beyond Llama's layout, kept out of the generic frontend.

- Models without an SDPA path (Gemma 2: attention logit softcapping) are built with the
  ``"ptqc"`` attention implementation registered here: it calls ``ptqc.attention`` directly with
  the layer's scale, sliding window and softcap, so the traced graph holds the canonical op.
  transformers builds no mask for it (the op is causal by itself).
- Checkpoint renamings keyed by the model class (GPT-NeoX's ``embed_out`` is the model's
  ``lm_head``), on top of those keyed by model type (:func:`ptqc.moe.rename_to_checkpoint`).
"""
from __future__ import annotations

import torch

from ptqc import moe, ops

ATTN_IMPLEMENTATION = "ptqc"


def ptqc_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                   sliding_window=None, softcap=None, **kwargs):
    """A transformers attention function (``AttentionInterface``): q, k, v [B, H(kv), S, D] ->
    ([B, S, H, D], None), the K/V heads not repeated (``ptqc.attention`` groups them)."""
    if dropout and module.training:
        raise ValueError("ptqc traces models in eval mode only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = int(sliding_window) if sliding_window else -1
    out = ops.attention(query, key, value, float(scale), True, window, float(softcap or 0.0))
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`ptqc_attention` with transformers under ``"ptqc"`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ptqc_attention)
    return ATTN_IMPLEMENTATION


def rename_to_checkpoint(g, keys, config) -> None:
    """Apply transformers' checkpoint renamings registered for the model's class names."""
    for arch in getattr(config, "architectures", None) or ():
        moe.rename_to_checkpoint(g, keys, arch)


def model_names(keys, config) -> dict[str, str]:
    """{checkpoint name: the model's name} for the ``keys`` transformers renames on loading (by
    model type and by class: Mixtral's ``block_sparse_moe.gate``, GPT-NeoX's ``embed_out``), per-expert
    tensors named as the model's per-expert linears (:func:`ptqc.moe.expert_model_names`)."""
    out = {}
    for kind in (getattr(config, "model_type", None), *(getattr(config, "architectures", None) or ())):
        found = {ck: mk for mk, ck in moe.checkpoint_names(keys, kind).items()} | moe.expert_model_names(keys, kind)
        out |= {ck: mk for ck, mk in found.items() if ck not in out}  # the model type's renamings first
    return out


def canonical_attention_args(node: torch.fx.Node) -> bool:
    """ptqc.attention as traced from :func:`ptqc_attention` (all positional) -> the canonical
    form: (q, k, v, scale) and keywords causal, window (set by the annotation), softcap if any."""
    if node.target != ops.ATTENTION or len(node.args) <= 4:
        return False
    q, k, v, scale, causal, window, softcap = (*node.args, *([0.0] * (7 - len(node.args))))
    node.args = (q, k, v, scale)
    node.kwargs = {"causal": bool(causal), "window": -1, **({"softcap": float(softcap)} if softcap else {})}
    return True


def _weight_t(a):
    """``w`` when ``a`` is ``w.T`` of a 2-D weight (permute [1, 0], t or transpose(0, 1))."""
    aten = torch.ops.aten
    if not (isinstance(a, torch.fx.Node) and a.op == "call_function"):
        return None
    w = a.args[0]
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None
    ok = (a.target == aten.permute.default and list(a.args[1]) == [1, 0] or a.target == aten.t.default
          or a.target == aten.transpose.int and sorted(a.args[1:3]) in ([0, 1], [-2, -1]))
    return w if ok else None


def rule_matmul_linear(node: torch.fx.Node) -> bool:
    """Falcon's ``x @ w.T + b`` (FalconLinear) -> ptqc.linear(x, w, b): a weight read transposed
    by a matmul, and the bias of the same module added right after it."""
    if node.target != torch.ops.aten.matmul.default:
        return False
    w = _weight_t(node.args[1])
    if w is None:
        return False
    from ptqc.frontend import _replace

    new = _replace(node, ops.LINEAR, (node.args[0], w, None))
    users = list(new.users)
    bias = w.target.rsplit(".", 1)[0] + ".bias"
    if len(users) == 1 and users[0].target == torch.ops.aten.add.Tensor:
        add = users[0]
        b = add.args[1] if add.args[0] is new else add.args[0]
        if isinstance(b, torch.fx.Node) and b.op == "get_attr" and b.target == bias:
            new.args = (new.args[0], w, b)
            add.replace_all_uses_with(new)
            add.graph.erase_node(add)
    return True


def check_constants(ep) -> None:
    """A tensor built inside ``forward`` (Falcon-7B's ``qkv[..., [-2], :]`` indexes with a Python
    list) is a constant whose value a meta-device trace never sees: refuse it, naming the module."""
    from ptqc.errors import PtqcError

    lifted = set(getattr(ep.graph_signature, "lifted_tensor_constants", ()))
    for name, c in getattr(ep, "constants", {}).items():
        if name in lifted and isinstance(c, torch.Tensor) and c.device.type == "meta":
            module, _, const = name.rpartition(".")
            raise PtqcError(f"unsupported construct in {module or 'the model'}: its forward builds a tensor "
                            f"constant ({const}, e.g. by indexing with a Python list) whose value a meta-device "
                            "trace cannot see")
