"""Per-expert calibration statistics of MoE expert stacks.

:class:`ExpertHessians` watches a whole ``ptqc.moe_experts`` call (``where="call"``): for each
expert e, the rows of x routed to it (gate/up input) and those rows' down input
act(x gate_e^T) * (x up_e^T) give two GPTQ Hessians, and ``counts[e]`` the routed tokens. The
forward keeps the real routing. With ``all_tokens`` every expert also sees every token (its
statistics only): the all-token Hessians a pass may use instead (``all_experts``) or for experts
routed fewer than ``min_tokens`` tokens (:func:`ptqc.passes.gptq.gptq_stack` uses them).
:class:`ExpertActs` keeps per-expert activation statistics the same way (max and mean |h| of the
down input, token-row samples) for smooth and awq; :func:`source` says which an expert uses.
"""
from __future__ import annotations

import torch

from ptqc import ops
from ptqc.observers import Samples, add_gram, mirrored


def source(count: int, all_experts: bool, min_tokens: int, few_tokens: str) -> str:
    """The statistics an expert routed ``count`` tokens uses: ``all`` (every token), ``routed``, or
    ``few_tokens`` (``all``, or the pass's fallback such as ``rtn``) below ``min_tokens`` or at 0."""
    if all_experts:
        return "all"
    return "routed" if count >= max(min_tokens, 1) else few_tokens


def _add(sums: list, e: int, x: torch.Tensor) -> None:
    sums[e] = add_gram(sums[e], x.float())


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
        return None if s is None else mirrored(s) * (2.0 / max(n, 1))


class _Acts:
    """max |h|, sum |h| and row count of the down input h per expert; x and h row samples."""

    def __init__(self, n: int, samples: int):
        self.max, self.sum, self.n = [None] * n, [None] * n, [0] * n
        self.xs = [Samples(max_tokens=samples, seed=e) for e in range(n)] if samples else None
        self.hs = [Samples(max_tokens=samples, seed=e) for e in range(n)] if samples else None

    def add(self, e: int, x: torch.Tensor | None, h: torch.Tensor) -> None:
        a = h.detach().float().abs()
        m, t = a.amax(0), a.sum(0)
        self.max[e] = m if self.max[e] is None else torch.maximum(self.max[e], m)
        self.sum[e] = t if self.sum[e] is None else self.sum[e] + t
        self.n[e] += h.shape[0]
        if self.hs is not None:
            self.hs[e].update(h.float())
            if x is not None:
                self.xs[e].update(x.float())


class ExpertActs:
    """Per-expert activation statistics of one experts node (``where="call"``): routed token
    ``counts``; of each expert's down input h = act(x gate_e^T) * (x up_e^T) its max and mean |h|
    per channel; with ``samples`` > 0 up to that many routed x and h rows per expert. With
    ``all_tokens`` the same over every token (the forward keeps the real routing)."""
    where = "call"

    def __init__(self, n_experts: int, act: str = "silu", down_act_bits: int = 0, all_tokens: bool = False,
                 samples: int = 0):
        self.act, self.bits, self.all_tokens = act, down_act_bits, all_tokens
        self.counts = torch.zeros(n_experts, dtype=torch.long)
        self.routed = _Acts(n_experts, samples)
        self.every = _Acts(n_experts, samples) if all_tokens else None

    def update(self, args) -> None:
        x, _, ids, gate, up = args[:5]
        x = x.detach().reshape(-1, x.shape[-1])
        ids = ids.reshape(x.shape[0], -1)
        for e in range(len(self.counts)):
            tok = (ids == e).any(-1).nonzero()[:, 0]
            self.counts[e] += tok.numel()
            if tok.numel():
                self.routed.add(e, x[tok], ops.moe_hidden(x[tok], gate[e], up[e], self.act, self.bits))
            if self.all_tokens:
                self.every.add(e, x if e == 0 else None, ops.moe_hidden(x, gate[e], up[e], self.act, self.bits))

    def _acts(self, all_tokens: bool) -> _Acts:
        return self.every if all_tokens else self.routed

    def down_max(self, e: int, all_tokens: bool = False) -> torch.Tensor | None:
        """max |h| per channel of expert e's down input (None: no rows)."""
        return self._acts(all_tokens).max[e]

    def down_mean(self, e: int, all_tokens: bool = False) -> torch.Tensor | None:
        a = self._acts(all_tokens)
        return None if a.sum[e] is None else a.sum[e] / a.n[e]

    def rows(self, which: str, e: int, all_tokens: bool = False) -> torch.Tensor | None:
        """Sampled rows of expert e's input (``x``, every expert's one with ``all_tokens``) or down input (``h``)."""
        a = self._acts(all_tokens)
        if which == "x":
            return (a.xs[0] if all_tokens else a.xs[e]).sample
        return a.hs[e].sample


class ExpertAsym:
    """GPTAQ's per-expert statistics of one experts node, fed the float and the quantized model's
    call values side by side: per expert, on the tokens the quantized model routes to it (or every
    token, ``all_tokens``), H = 2/n sum x_q x_q^T and dXX^T = 2/n sum (x_fp - x_q) x_q^T of the
    gate/up input and of the down input."""

    def __init__(self, n_experts: int, act: str = "silu", down_act_bits: int = 0, all_tokens: bool = False):
        self.act, self.bits, self.all_tokens = act, down_act_bits, all_tokens
        self.counts = torch.zeros(n_experts, dtype=torch.long)
        self.tokens = 0
        self.sums = {(k, a): [None] * n_experts for k in ("in", "down") for a in (False, True)}

    def _add(self, key, e: int, xf: torch.Tensor, xq: torch.Tensor) -> None:
        xf, xq = xf.float(), xq.float()
        h, d = xq.t() @ xq, (xf - xq).t() @ xq
        s = self.sums[key]
        s[e] = (h, d) if s[e] is None else (s[e][0] + h, s[e][1] + d)

    def update(self, fp: tuple, args) -> None:
        """``fp``: the float model's (x, gate, up) at this node; ``args``: the quantized model's call values."""
        xf, gf, uf = fp
        xq, _, ids, gq, uq = args[:5]
        xf, xq = xf.reshape(-1, xf.shape[-1]), xq.detach().reshape(-1, xq.shape[-1])
        ids = ids.reshape(xq.shape[0], -1)
        self.tokens += xq.shape[0]
        for e in range(len(self.counts)):
            tok = (ids == e).any(-1).nonzero()[:, 0]
            self.counts[e] += tok.numel()
            for every in (False, True):
                if every and not self.all_tokens or not every and not tok.numel():
                    continue
                a, b = (xf, xq) if every else (xf[tok], xq[tok])
                if not every or e == 0:
                    self._add(("in", every), e, a, b)
                self._add(("down", every), e, ops.moe_hidden(a, gf[e], uf[e], self.act, self.bits),
                          ops.moe_hidden(b, gq[e], uq[e], self.act, self.bits))

    def hessian(self, proj: str, e: int, all_tokens: bool = False):
        """(H, dXX^T) of expert e's ``proj`` input (None: no rows)."""
        key = ("in" if proj != "down" else "down", all_tokens)
        s = self.sums[key][0 if all_tokens and proj != "down" else e]
        n = self.tokens if all_tokens else int(self.counts[e])
        return None if s is None else (s[0] * (2.0 / n), s[1] * (2.0 / n))
