"""Per-expert calibration statistics of MoE expert stacks.

:class:`ExpertHessians` watches a whole ``ptqc.moe_experts`` call (``where="call"``): for each
expert e, the rows of x routed to it (gate/up input) and those rows' down input
act(x gate_e^T) * (x up_e^T) give two GPTQ Hessians, and ``counts[e]`` the routed tokens. The
forward keeps the real routing. With ``all_tokens`` every expert also sees every token (its
statistics only): the all-token Hessians a pass may use instead (``all_experts``) or for experts
routed fewer than ``min_tokens`` tokens (:func:`ptqc.passes.gptq.gptq_stack` uses them).
"""
from __future__ import annotations

import torch

from ptqc import ops


def _add(sums: list, e: int, x: torch.Tensor) -> None:
    x = x.float()
    sums[e] = x.t() @ x if sums[e] is None else sums[e].addmm_(x.t(), x)


class ExpertHessians:
    """Hessians 2/n sum x x^T per expert of one experts node: routed rows (and all rows)."""
    where = "call"

    def __init__(self, n_experts: int, act: str = "silu", down_act_bits: int = 0, all_tokens: bool = False):
        self.act, self.bits, self.all_tokens = act, down_act_bits, all_tokens
        self.counts = torch.zeros(n_experts, dtype=torch.long)
        self.tokens = 0
        self.h_in, self.h_down = [None] * n_experts, [None] * n_experts
        self.all_in, self.all_down = [None], [None] * n_experts

    def update(self, args) -> None:
        x, _, ids, gate, up = args[:5]
        x = x.detach().reshape(-1, x.shape[-1])
        ids = ids.reshape(x.shape[0], -1)
        self.tokens += x.shape[0]
        if self.all_tokens:
            _add(self.all_in, 0, x)
        for e in range(len(self.h_in)):
            tok = (ids == e).any(-1).nonzero()[:, 0]
            self.counts[e] += tok.numel()
            if tok.numel():
                _add(self.h_in, e, x[tok])
                _add(self.h_down, e, ops.moe_hidden(x[tok], gate[e], up[e], self.act, self.bits))
            if self.all_tokens:
                _add(self.all_down, e, ops.moe_hidden(x, gate[e], up[e], self.act, self.bits))

    def hessian(self, proj: str, e: int, all_tokens: bool = False) -> torch.Tensor | None:
        """Expert e's Hessian of the input of ``proj`` (None: no rows)."""
        if all_tokens:
            s, n = (self.all_in[0] if proj != "down" else self.all_down[e]), self.tokens
        else:
            s, n = (self.h_in[e] if proj != "down" else self.h_down[e]), int(self.counts[e])
        return None if s is None else s * (2.0 / max(n, 1))
