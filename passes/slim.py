"""slim: salience-driven mixed-precision groups with GPTQ inside (SliM-LLM, Huang et al., 2024).

Each group of ``group`` input columns gets its own bit width among {bits-1, bits, bits+1}, as many
groups up as down (the average is exactly ``bits``). Per linear:

1. **Group salience**: the OBS saliency w_ij^2 / U_jj^2 (U: the upper Cholesky factor of H^-1 in
   GPTQ's column order) summed over a group's columns and rows.
2. **Allocation** (SliM-LLM's "SBA"): candidate i = 0 .. G/2 puts the i least salient groups at
   bits-1 and the i most salient at bits+1 (i = 0 is uniform ``bits``). ``search=gptq`` quantizes
   every candidate and keeps the lowest output error tr(dW H dW^T), so never worse than plain GPTQ
   on the calibration data; ``search=rtn`` picks by the RTN error (the reference code's proxy,
   which on examples/tiny-qwen2 picked mixes worse than uniform GPTQ) and runs GPTQ once.
3. **GPTQ with per-group grids** (:mod:`ptqc.gptq_core`), static groups with ``act_order``.

1-bit groups (bits=2): ``one_bit=sign`` binarizes them a*sign(w) per row (a = mean |w|; codes
-1/+1, zero point 0); ``one_bit=grid`` uses the shared quantizer's 1-bit grid, which always
contains 0. Storage is real: every group's codes, scale and zero point come from ``ptqc.quant`` at
its own width, stored as int8 codes with a QuantSpec of the widest width; the manifest lists
``group_bits`` (a backend that packs codes must pack each group at its width), ``avg_bits`` and
the errors ``err_slim``, ``err_gptq``, ``err_rtn`` and ``err_rtn_mixed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.gptq_core import SingularHessian, inverse_cholesky, output_error, quantize_groups, visiting_order
from ptqc.options import WeightOptions
from ptqc.passes.gptq import calibrate_hessians
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import grouped_targets, set_quantized_weight, weight_of


# ---- one group's grid ----------------------------------------------------------------------------
def group_qparams(x: torch.Tensor, bits: int, sym: bool, one_bit: str = "sign"):
    """Scale [rows, 1] and zero point ([rows, 1] int8, None if sym) of columns x at ``bits``."""
    if bits == 1 and one_bit == "sign":
        a = x.abs().mean(1, keepdim=True)
        scale = torch.where(a > 0, a, torch.ones_like(a))
        return scale, None if sym else torch.zeros_like(scale, dtype=torch.int8)
    return quant.compute_qparams(x, quant.QuantSpec(bits, 0, sym))


def group_codes(x: torch.Tensor, scale, zp, bits: int, sym: bool, one_bit: str = "sign") -> torch.Tensor:
    """int8 codes of columns x on the grid (scale, zp) of a ``bits`` group."""
    if bits == 1 and one_bit == "sign":
        return torch.where(x >= 0, 1, -1).to(torch.int8)
    return quant.quantize(x, scale, zp, quant.QuantSpec(bits, 0, sym))


def rtn_mixed(w: torch.Tensor, group_bits: list[int], group: int, sym: bool, one_bit: str = "sign") -> torch.Tensor:
    """Round-to-nearest with per-group bit widths (dequantized)."""
    out = torch.empty_like(w)
    for gi, b in enumerate(group_bits):
        x = w[:, gi * group:(gi + 1) * group]
        s, z = group_qparams(x, b, sym, one_bit)
        out[:, gi * group:(gi + 1) * group] = quant.dequantize(group_codes(x, s, z, b, sym, one_bit), s, z, 0)
    return out


# ---- salience-determined bit allocation ----------------------------------------------------------
def group_salience(w: torch.Tensor, d: torch.Tensor, group: int) -> torch.Tensor:
    """Sum of w_ij^2 / U_jj^2 over each group's columns and all rows ([groups]; d = U_jj per column)."""
    return (w ** 2 / d[None, :] ** 2).reshape(w.shape[0], -1, group).sum((0, 2))


def candidate_allocations(salience: torch.Tensor, bits: int) -> list[list[int]]:
    """Allocation i = 0 .. G/2: the i least salient groups at bits-1, the i most salient at bits+1."""
    G = len(salience)
    if not (bits - 1 >= 1 and bits + 1 <= 8):
        return [[bits] * G]
    order = torch.argsort(salience).tolist()  # least salient first
    out = []
    for i in range(G // 2 + 1):
        b = [bits] * G
        for j in range(i):
            b[order[j]], b[order[G - 1 - j]] = bits - 1, bits + 1
        out.append(b)
    return out


def rtn_errors(w: torch.Tensor, h: torch.Tensor, cands: list[list[int]], group: int, sym: bool,
               one_bit: str = "sign") -> list[float]:
    """Relative output error tr(dW H dW^T) / tr(W H W^T) of RTN with each allocation. Consecutive
    candidates differ in two groups, so M = dW H is updated by those groups' columns only."""
    G = w.shape[1] // group
    dq = {b: rtn_mixed(w, [b] * G, group, sym, one_bit) - w for b in sorted({b for c in cands for b in c})}
    ref = max(((w @ h) * w).sum().item(), 1e-30)
    cur = [cands[0][0]] * G
    dW = dq[cur[0]].clone()
    M = dW @ h
    errs = []
    for c in cands:
        for gi in (gi for gi in range(G) if c[gi] != cur[gi]):
            cols = slice(gi * group, (gi + 1) * group)
            delta = dq[c[gi]][:, cols] - dW[:, cols]
            dW[:, cols] = dq[c[gi]][:, cols]
            M += delta @ h[cols, :]
            cur[gi] = c[gi]
        errs.append((dW * M).sum().item() / ref)
    return errs


# ---- GPTQ with per-group grids -------------------------------------------------------------------
def hinv_diag(h: torch.Tensor, damp: float, retries: int, act_order: bool) -> torch.Tensor:
    """U_jj per original column, U the Cholesky factor of H^-1 in GPTQ's column order."""
    perm = visiting_order(h, act_order)
    U, _ = inverse_cholesky(h, damp, retries, perm)
    d = torch.empty_like(torch.diag(U))
    d[perm] = torch.diag(U)
    return d


def slim_quantize(w: torch.Tensor, h: torch.Tensor, group_bits: list[int], group: int, *, sym: bool = False,
                  block: int = 128, damp: float = 0.01, act_order: bool = True, retries: int = 4,
                  one_bit: str = "sign"):
    """GPTQ one weight [out, in] (Hessian [in, in]) where group gi uses ``group_bits[gi]`` bits.

    Returns (codes int8 [out, in], scale [out, groups], zero_point or None, the dequantized weight
    the loop used, damp used)."""
    return quantize_groups(w, h, group_bits, group, sym=sym, block=block, damp=damp, act_order=act_order,
                           retries=retries, qparams=partial(group_qparams, one_bit=one_bit),
                           codes_of=partial(group_codes, one_bit=one_bit))


@register
class SliM(Pass):
    """SliM-LLM mixed-precision groups: per-group bits among {bits-1, bits, bits+1} (as many up as
    down, so the average is exactly `bits`) chosen by Hessian salience, then GPTQ per group grid.

    Calibrated, layer by layer with quantized-input propagation. Stores real int8 codes, scales and
    zero points (each group's own grid, QuantSpec of the largest width); the manifest lists
    `group_bits` per linear. `search=gptq` runs GPTQ for each of the G/2+1 salience-ranked
    allocations and keeps the best (never worse than uniform GPTQ on the calibration data);
    `search=rtn` picks one by the RTN error. bits=2 uses 1-bit groups: `one_bit=sign` binarizes them
    a*sign(w), `one_bit=grid` uses the shared quantizer's asymmetric 1-bit grid.
    """

    name = "slim"
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant"})

    @dataclass
    class Options(WeightOptions):
        bits: int = 2  # target average bits (groups get bits-1, bits, bits+1)
        group: int = 128  # columns per group (each group has its own bit width)
        damp: float = 0.01  # x mean(diag H)
        block: int = 128
        act_order: bool = True
        retries: int = 4  # damp x10 per retry when Cholesky fails
        one_bit: str = "sign"  # sign | grid: how 1-bit groups are quantized
        search: str = "gptq"  # gptq: run GPTQ for every allocation, keep the best | rtn: RTN proxy picks one
        propagate: str = "quantized"  # quantized | float

        def weight_spec(self):  # the widest grid a group may get
            return quant.QuantSpec(min(self.bits + 1, 8), self.group, self.sym)

        def validate(self):
            if not 2 <= self.bits <= 4:
                raise PtqcError(f"bits={self.bits} is outside 2..4 (the target average)")
            if self.group < 1:
                raise PtqcError(f"group={self.group} must be a positive group size (bits vary per group)")
            if not 0 < self.damp < 10 or self.block < 1 or self.retries < 0:
                raise PtqcError("damp must be in (0, 10), block >= 1, retries >= 0")
            if self.one_bit not in ("sign", "grid") or self.propagate not in ("quantized", "float"):
                raise PtqcError("one_bit is sign|grid and propagate is quantized|float")
            if self.search not in ("gptq", "rtn"):
                raise PtqcError(f"search={self.search!r}: use gptq or rtn")
            if self.sym and self.bits == 2 and self.one_bit == "grid":
                raise PtqcError("sym with one_bit=grid has no 1-bit grid; use one_bit=sign or sym=false")

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        opts, groups = grouped_targets(qm, self)
        acc = {"err_slim": [], "err_rtn": [], "bits": {}, "params": 0, "bit_sum": 0, "mixed": 0}

        def quantize(lins, h):
            for n in lins:  # one by one: each linear has its own allocation
                self._quantize(qm, n, opts[n.name], h.float(), acc)

        summary = calibrate_hessians(qm, ctx, groups, quantize, o.propagate, "slim")
        k = max(len(acc["err_slim"]), 1)
        return PassResult(changed=bool(opts), summary={
            **summary, "linears": len(opts), "mixed_linears": acc["mixed"], "avg_bits": round(acc["bit_sum"] / max(acc["params"], 1), 4),
            "groups_per_bits": dict(sorted(acc["bits"].items())),
            "mean_err_slim": round(sum(acc["err_slim"]) / k, 6), "mean_err_rtn": round(sum(acc["err_rtn"]) / k, 6)})

    def _quantize(self, qm, n, mo, h, acc) -> None:
        module = n.meta["ptqc"]["module"]
        w = weight_of(qm, n).float().to(h.device)
        try:
            cands = candidate_allocations(group_salience(w, hinv_diag(h, mo.damp, mo.retries, mo.act_order),
                                                         mo.group), mo.bits)
            proxy = rtn_errors(w, h, cands, mo.group, mo.sym, mo.one_bit)
            tried = range(len(cands)) if mo.search == "gptq" else [min(range(len(cands)), key=proxy.__getitem__)]
            runs = []  # (output error, candidate, GPTQ result)
            for i in tried:
                out = slim_quantize(w, h, cands[i], mo.group, sym=mo.sym, block=mo.block, damp=mo.damp,
                                    act_order=mo.act_order, retries=mo.retries, one_bit=mo.one_bit)
                runs.append((output_error(w, out[3], h, max_rows=None), i, out))  # decides: exact
        except SingularHessian as e:
            raise PtqcError(f"{module}: {e}; raise damp or give more calibration data") from None
        e_slim, best, (codes, scale, zp, _, used) = min(runs, key=lambda r: (r[0], r[1]))
        group_bits = cands[best]
        spec = quant.QuantSpec(max(max(group_bits), 2), mo.group, mo.sym)
        acc["err_slim"].append(e_slim)
        acc["err_rtn"].append(proxy[0])
        acc["mixed"] += best > 0
        for b in group_bits:
            acc["bits"][b] = acc["bits"].get(b, 0) + 1
        acc["params"] += w.numel()
        acc["bit_sum"] += w.shape[0] * mo.group * sum(group_bits)
        extra = {"err_gptq": round(runs[0][0], 8)} if mo.search == "gptq" else {}  # candidate 0 is uniform GPTQ
        set_quantized_weight(qm, n, spec, codes.cpu(), scale.cpu(), zp.cpu() if zp is not None else None, "slim", {
            "group_bits": group_bits, "avg_bits": round(sum(group_bits) / len(group_bits), 4),
            "one_bit": mo.one_bit if 1 in group_bits else None, "search": mo.search, "candidates": len(cands),
            "damp": used, "act_order": mo.act_order, "err_slim": round(e_slim, 8), **extra,
            "err_rtn": round(proxy[0], 8), "err_rtn_mixed": round(proxy[best], 8)})
