"""Activation statistics a calibrated pass asks for, per linear input or output.

A pass hands the calibration engine (:mod:`ptqc.calib`) a dict ``{linear node: {name:
observer}}`` for one decoder layer; the engine feeds every observer the tensor it watches
(``where="input"``: the linear's activation input, ``"output"``: its result) for every
calibration batch, then the pass reads ``observer.result()``. All statistics reduce over
every dimension but the last (tokens), so a result is per input/output channel.

    AbsMax      max |x| per channel (or per tensor)          SmoothQuant, static int8 scales
    MinMax      min and max per channel (or per tensor)      asymmetric static activation ranges
    Percentile  quantiles of x from a bounded random sample  clipped activation ranges
    MeanAbs     running mean of |x| per channel              AWQ's activation salience
    Hessian     H = 2/n sum_t x_t x_t^T  (float32)           GPTQ, GPTAQ, BiLLM, SliM-LLM
    Samples     a seeded random subset of token rows of x    MSE-based grid searches (AWQ, clip)
"""
from __future__ import annotations

import torch


class Observer:
    where = "input"
    arg = 0  # which positional input of the observed node ("input" observers), e.g. 1 for attention's K

    def __init__(self, where: str = "input"):
        if where not in ("input", "output"):
            raise ValueError(f"where={where!r}: use 'input' or 'output'")
        self.where = where
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch: the token rows [tokens, channels] of x."""
        rows = x.detach().reshape(-1, x.shape[-1])
        self.tokens += rows.shape[0]
        self.add(rows)

    def add(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self):  # pragma: no cover - abstract
        raise NotImplementedError


class AbsMax(Observer):
    def __init__(self, where="input", per_channel: bool = True):
        super().__init__(where)
        self.per_channel = per_channel
        self.value = None

    def add(self, x):
        m = x.abs().amax(0).float() if self.per_channel else x.abs().amax().float()
        self.value = m if self.value is None else torch.maximum(self.value, m)

    def result(self) -> torch.Tensor:
        return self.value


class MinMax(Observer):
    def __init__(self, where="input", per_channel: bool = False):
        super().__init__(where)
        self.per_channel = per_channel
        self.min = self.max = None

    def add(self, x):
        x = x.float()
        lo, hi = (x.amin(0), x.amax(0)) if self.per_channel else (x.amin(), x.amax())
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min, self.max


def _bottom_k(pool, keys, new, k: int, gen: torch.Generator):
    """Uniform sample without replacement of at most k rows: every row ever seen gets a random
    key and the k smallest keys are kept (bottom-k sampling), whatever the batch order."""
    nk = torch.rand(new.shape[0], generator=gen)
    if pool is not None:
        new, nk = torch.cat([pool, new]), torch.cat([keys, nk])
    if new.shape[0] > k:
        idx = nk.topk(k, largest=False).indices.sort().values
        new, nk = new[idx.to(new.device)], nk[idx]
    return new, nk


class Percentile(Observer):
    """Quantiles (``q`` and ``1 - q``) of x over a uniform random sample of at most
    ``max_values`` elements (exact when everything fits). ``absolute=True``: quantile of |x|."""

    def __init__(self, where="input", q: float = 0.999, absolute: bool = False,
                 max_values: int = 1 << 21, seed: int = 0):
        super().__init__(where)
        if not 0.5 <= q <= 1.0:
            raise ValueError(f"q={q} must be in [0.5, 1]")
        self.q, self.absolute, self.max_values = q, absolute, max_values
        self.gen = torch.Generator().manual_seed(seed)
        self.sample = self.keys = None

    def add(self, x):
        v = x.reshape(-1).float().cpu()
        self.sample, self.keys = _bottom_k(self.sample, self.keys, v.abs() if self.absolute else v,
                                           self.max_values, self.gen)

    def result(self):
        s = self.sample.sort().values

        def at(p):
            return s[min(int(round(p * (s.numel() - 1))), s.numel() - 1)]
        return at(self.q) if self.absolute else (at(1 - self.q), at(self.q))


class MeanAbs(Observer):
    def __init__(self, where="input"):
        super().__init__(where)
        self.sum = None

    def add(self, x):
        s = x.float().abs().sum(0)
        self.sum = s if self.sum is None else self.sum + s

    def result(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)


GRAM_BLOCK = 1024


def add_gram(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """acc + x^T x, in place. Past ``GRAM_BLOCK`` columns only the upper triangle is accumulated,
    block row by block row (acc[i:i+B, i:] += x[:, i:i+B]^T x[:, i:]): x^T x is symmetric, so
    about half the flops at 4096+ widths (at 7B's down_proj, 11008 wide, 2.0 of 4.0 TFLOP per
    16k tokens). :func:`mirrored` fills in the lower triangle once, when the sum is read."""
    n = x.shape[1]
    if n <= GRAM_BLOCK:
        return x.t() @ x if acc is None else acc.addmm_(x.t(), x)
    if acc is None:
        acc = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, GRAM_BLOCK):
        acc[i:i + GRAM_BLOCK, i:].addmm_(x[:, i:i + GRAM_BLOCK].t(), x[:, i:])
    return acc


def mirrored(acc: torch.Tensor) -> torch.Tensor:
    """The upper block triangle left by :func:`add_gram` copied into the lower one, in place."""
    for i in range(0, acc.shape[0] - GRAM_BLOCK, GRAM_BLOCK):
        acc[i + GRAM_BLOCK:, i:i + GRAM_BLOCK].copy_(acc[i:i + GRAM_BLOCK, i + GRAM_BLOCK:].t())
    return acc


class Hessian(Observer):
    """H = 2/n * sum over tokens of x x^T, the GPTQ proxy Hessian of ||W x - Q(W) x||^2."""

    def __init__(self, where="input", dtype: torch.dtype = torch.float32):
        super().__init__(where)
        self.dtype = dtype
        self.sum = None
        self.scaled = False

    def add(self, x):
        assert not self.scaled, "Hessian read before its last batch"
        self.sum = add_gram(self.sum, x.to(self.dtype))  # in place: no [in, in] temporary per batch

    def result(self) -> torch.Tensor:
        """The sum mirrored and scaled by 2/n in place the first time it is read: at 70B widths
        one [in, in] float32 matrix is 3.3 GB, so no copy is made."""
        if not self.scaled:
            mirrored(self.sum).mul_(2.0 / max(self.tokens, 1))
            self.scaled = True
        return self.sum


class Samples(Observer):
    """At most ``max_tokens`` token rows of x, a uniform random sample (seeded)."""

    def __init__(self, where="input", max_tokens: int = 4096, seed: int = 0):
        super().__init__(where)
        self.max_tokens = max_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.sample = self.keys = None

    def add(self, x):
        self.sample, self.keys = _bottom_k(self.sample, self.keys, x, self.max_tokens, self.gen)

    def result(self) -> torch.Tensor:
        return self.sample
