"""AWQ on MoE blocks (used by :mod:`ptqc.passes.awq`).

Block input: the experts' gate/up (and the shared expert's) read one x, so their scale can only
be folded into the post-attention norm if it is one scale for all of them (AutoAWQ's MoE
recipe): candidates from mean|x| over every token reaching the block and mean|w| over every
expert's gate/up rows, scored by the squared error of the whole block's output (experts + shared
expert) on the float layer; the linears that stay float (router, shared-expert gate) are
compensated exactly. down_proj: each expert has its own scale, searched on its routed tokens
(the squared error of that expert's down output), folded into that expert's up_proj rows. Clip
search per expert on its routed rows. An expert routed fewer than ``min_tokens`` tokens uses the
all-token statistics (``few_tokens=all``) or no scale and no clip (``rtn``), recorded per expert.
"""
from __future__ import annotations

import torch

from ptqc import experts, quant
from ptqc.experts import ExpertSite
from ptqc.ir import info
from ptqc.moe_calib import ExpertActs, source
from ptqc.observers import MeanAbs, Samples
from ptqc.weights import fold_input_scale, set_quantized_weight, weight_of


def observers(qm, node, mo, samples: int) -> dict:
    """What AWQ observes at an experts node: x (mean |x|, sampled rows) and per-expert statistics."""
    e = qm.store.spec(node.args[3].target)[0][0]
    acts = ExpertActs(e, node.kwargs.get("act", "silu"), node.kwargs.get("down_act_bits", 0),
                      all_tokens=mo.all_experts or mo.few_tokens == "all", samples=samples)
    return {"x": Samples(max_tokens=samples), "mean": MeanAbs(), "acts": acts}


def block_output(seg, node):
    """The MoE block's output: the last node of the block's module (experts + shared expert) in
    the layer, else the experts node."""
    block = info(node)["module"].rsplit(".", 1)[0]
    pos = seg.nodes.index(node)
    outs = [n for n in seg.nodes[pos:] if info(n).get("module") == block]
    return outs[-1] if outs else node


def stack_sources(acts: ExpertActs, mo) -> list[str]:
    """Per expert: ``routed``, ``all`` or ``rtn`` (see :func:`ptqc.moe_calib.source`)."""
    return [source(int(c), mo.all_experts, mo.min_tokens, mo.few_tokens) for c in acts.counts]


def search_block(qm, node, lins, spec_of, block, mean_x, grid: int):
    """One scale for the MoE block input (experts' gate/up and quantized shared linears), scored
    on ``block`` (an :class:`ptqc.passes.awq.Block` ending at the block output)."""
    from ptqc.passes.awq import search_scale

    stacks = [ExpertSite(node, p) for p in ("gate", "up") if ExpertSite(node, p).name in spec_of]
    quantized = [*stacks, *(n for n in lins if n.name in spec_of)]
    ws = {(n.node.args[n.arg] if isinstance(n, ExpertSite) else n.args[1]).target:
          (weight_of(qm, n).float(), spec_of[n.name]) for n in quantized}

    def loss(s):
        return block.loss({k: (quant.fake_quantize(w * s, sp) / s).to(qm.dtype) for k, (w, sp) in ws.items()})

    flat = [w.reshape(-1, w.shape[-1]) for w, _ in ws.values()]
    s, rec = search_scale(mean_x, flat, next(iter(ws.values()))[1], grid, loss)
    return s, quantized, rec


def search_down(qm, node, spec, acts: ExpertActs, srcs: list[str], grid: int) -> tuple[torch.Tensor, list]:
    """Per-expert down_proj input scales [E, I], each searched on the expert's own rows of h
    (the error of its down output); 1 for experts with ``rtn``."""
    from ptqc.passes.awq import search_scale

    down = weight_of(qm, ExpertSite(node, "down")).float()
    scales, gains = [], []
    for e, src in enumerate(srcs):
        h = acts.rows("h", e, src == "all") if src != "rtn" else None
        if h is None:
            scales.append(torch.ones(down.shape[2]))
            continue
        w, ref = down[e], h @ down[e].t()

        def loss(s, w=w, h=h, ref=ref):
            return (h @ (quant.fake_quantize(w * s, spec) / s).t() - ref).pow(2).mean().item()

        s, rec = search_scale(acts.down_mean(e, src == "all"), [w], spec, grid, loss)
        scales.append(s)
        gains.append(rec["loss_after"] / rec["loss_before"] if rec["loss_before"] > 0 else 1.0)
    return torch.stack(scales), gains


def fold_block(qm, node, s) -> list:
    """Fold the block input scale into the norm; every reader of x scaled (float ones compensated)."""
    src, lins, _ = experts.block_input(qm, node)
    fold_input_scale(qm, src, [ExpertSite(node, "gate"), ExpertSite(node, "up"), *lins], s)
    return lins


def clip_quantize_stack(qm, site: ExpertSite, spec, acts: ExpertActs, srcs: list[str], x_scale, h_scale,
                        mo, scaled: bool) -> dict:
    """Clip search per expert on its rows (x / the block scale for gate/up, h / its down scale for
    down; none for ``rtn`` experts), then RTN of the stack; the stack's record."""
    from ptqc.passes.awq import search_clip

    W = weight_of(qm, site).float()
    clipped = []
    for e, src in enumerate(srcs):
        rows = acts.rows("h" if site.proj == "down" else "x", e, src == "all") if mo.clip and src != "rtn" else None
        if rows is None:
            continue
        rows = rows / (h_scale[e] if site.proj == "down" else x_scale)
        W[e] = search_clip(rows, W[e], spec)
        clipped.append(e)
    qm.store[site.node.args[site.arg].target] = W.to(qm.dtype)
    few = [] if mo.all_experts else [e for e, c in enumerate(acts.counts.tolist()) if c < max(mo.min_tokens, 1)]
    rec = {"tokens": acts.counts.tolist(), "fallback": few, "min_tokens": mo.min_tokens, "few_tokens": mo.few_tokens,
           "stats": "all" if mo.all_experts else "routed", "scaled": scaled, "clipped": clipped}
    if mo.quantize:
        set_quantized_weight(qm, site, spec, *quant.rtn(W, spec), "awq", rec)
    return rec
