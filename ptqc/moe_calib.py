"""Per-expert calibration statistics and GPTQ of MoE expert stacks.

:class:`ExpertHessians` watches a whole ``ptqc.moe_experts`` call (``where="call"``): for each
expert e, the rows of x routed to it (gate/up input) and those rows' down input
act(x gate_e^T) * (x up_e^T) give two GPTQ Hessians, and ``counts[e]`` the routed tokens. The
forward keeps the real routing. With ``all_tokens`` every expert also sees every token (its
statistics only): the all-token Hessians a pass may use instead (``all_experts``) or for experts
routed fewer than ``min_tokens`` tokens.

:func:`gptq_stack` quantizes a stack expert by expert with the shared GPTQ core; an expert
short of tokens takes the all-token statistics (``few_tokens="all"``) or RTN (``"rtn"``),
recorded in ``fallback``.
"""
from __future__ import annotations

import torch

from ptqc import ops, quant
from ptqc.errors import PtqcError
from ptqc.gptq_core import SingularHessian, output_error


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


def _gptq_one(w, h, spec, mo, where: str):
    """(codes, scale, zp, damp) of one expert's [out, in] by GPTQ; mo.fallback=rtn on a singular H."""
    from ptqc.passes.gptq import gptq_quantize

    try:
        return gptq_quantize(w, h, spec, block=mo.block, damp=mo.damp, act_order=mo.act_order, retries=mo.retries)
    except SingularHessian as e:
        if mo.fallback != "rtn":
            raise PtqcError(f"{where}: {e}; raise damp, give more calibration data, or allow fallback=rtn") from None
        return (*_rtn_one(w, spec), None)


def _rtn_one(w, spec):
    scale, zp = quant.compute_qparams(w, spec)
    return quant.quantize(w, scale, zp, spec), scale, zp


def gptq_stack(site, W: torch.Tensor, stats: ExpertHessians, spec, mo) -> tuple:
    """GPTQ the stack W [E, out, in] of ``site`` expert by expert (see module doc). Returns
    (codes, scale, zp, record) with the record's per-expert ``tokens`` and ``fallback`` ids."""
    parts, fallback, errs = [], [], {"gptq": [], "rtn": []}
    for e in range(W.shape[0]):
        w = W[e].float()
        few = not mo.all_experts and int(stats.counts[e]) < mo.min_tokens
        h = stats.hessian(site.proj, e, all_tokens=mo.all_experts or (few and mo.few_tokens == "all"))
        if few or h is None:
            fallback.append(e)
        if h is None or (few and mo.few_tokens == "rtn"):
            parts.append(_rtn_one(w, spec))
            continue
        c, s, z, _ = _gptq_one(w, h, spec, mo, f"{site.module} expert {e}")
        parts.append((c, s, z))
        rc, rs, rz = _rtn_one(w, spec)
        errs["gptq"].append(output_error(w, quant.dequantize(c, s, z, spec.group_size), h))
        errs["rtn"].append(output_error(w, quant.dequantize(rc, rs, rz, spec.group_size), h))
    codes, scale = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    zp = torch.stack([p[2] for p in parts]) if parts[0][2] is not None else None
    rec = {"tokens": stats.counts.tolist(), "fallback": fallback, "min_tokens": mo.min_tokens,
           "stats": "all" if mo.all_experts else "routed", "few_tokens": mo.few_tokens,
           **{f"err_{k}": round(sum(v) / len(v), 8) for k, v in errs.items() if v}}
    return codes, scale, zp, rec
