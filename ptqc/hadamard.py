"""Orthonormal Hadamard matrices of the sizes LLMs use, for rotations (QuaRot) and online transforms.

A Hadamard matrix of order n has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is orthogonal.
They exist only for n = 1, 2 or a multiple of 4. Model widths are usually ``k * 2^m`` with a
small odd-ish part ``k`` (hidden 3584 = 28 * 128, intermediate 11008 = 344 * 32, 384 = 12 * 32),
so we build

    hadamard(n) = (H_k kron S_{2^m}) / sqrt(n)

where ``S_{2^m}`` is Sylvester's (``S_1 = [1]``, ``S_2j = [[S_j, S_j], [S_j, -S_j]]``) and ``H_k``
comes from one of the Paley constructions over the finite field GF(q), q a prime power, with
chi the quadratic character of GF(q) and the Jacobsthal matrix ``J[a, b] = chi(a - b)``:

    Paley I   q = 3 mod 4:  order q + 1:    H = I + C,  C = [[0, 1^T], [-1, J]]   (C skew)
    Paley II  q = 1 mod 4:  order 2(q + 1): C = [[0, 1^T], [1, J]]               (C symmetric)
                            H = C kron [[1, 1], [1, -1]] + I kron [[1, -1], [-1, -1]]

(e.g. k = 28: q = 13 (II); 344: q = 7^3). :func:`factor` picks the smallest such k; a size with
none (e.g. 92 = 4 * 23, or any odd size > 1) is refused. :func:`kron_factors` splits
``hadamard(n)`` into two small factors, so an online transform costs ``n (n1 + n2)``
multiply-adds per token instead of ``n^2``.
"""
from __future__ import annotations

import functools
import math

import torch

from ptqc.errors import PtqcError

MAX_ORDER = 4096  # largest non-power-of-two factor k we build (a q x q Jacobsthal matrix)


# ---- finite fields -------------------------------------------------------------------------------
def prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _polymod(r: list, f: tuple, p: int) -> list:
    """The remainder of polynomial r modulo the monic f over GF(p) (coefficients lowest degree first)."""
    r, e = list(r), len(f) - 1
    for d in range(len(r) - 1, e - 1, -1):
        c = r[d]
        if c:
            for t in range(e + 1):
                r[d - e + t] = (r[d - e + t] - c * f[t]) % p
    return r[:e]


def _polymulmod(x: tuple, y: tuple, f: tuple, p: int) -> tuple:
    """x * y mod (f, p)."""
    prod = [0] * (len(x) + len(y) - 1)
    for i, a in enumerate(x):
        for j, b in enumerate(y):
            prod[i + j] = (prod[i + j] + a * b) % p
    return tuple(_polymod(prod, f, p))


def _irreducible(p: int, e: int) -> tuple:
    """A monic irreducible polynomial of degree e over GF(p) (no monic factor of degree <= e/2)."""
    def polys(deg):  # all monic polynomials of degree deg
        for code in range(p ** deg):
            yield tuple((code // p ** i) % p for i in range(deg)) + (1,)

    for f in polys(e):
        if all(any(_polymod(f, g, p)) for d in range(1, e // 2 + 1) for g in polys(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> torch.Tensor:
    """J[a, b] = chi(a - b) over GF(q) (elements numbered by their base-p digits), int8 [q, q]."""
    p, e = prime_power(q)
    if e == 1:
        square = torch.zeros(q, dtype=torch.bool)
        square[torch.arange(1, q) ** 2 % q] = True
        chi = torch.where(square, 1, -1).to(torch.int8)
        chi[0] = 0
        idx = torch.arange(q, dtype=torch.int32)
        return chi[(idx[:, None] - idx[None, :]) % q]
    f = _irreducible(p, e)
    digits = [tuple((c // p ** i) % p for i in range(e)) for c in range(q)]
    weights = [p ** i for i in range(e)]
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[0] = 0
    for y in digits[1:]:
        chi[sum(c * w for c, w in zip(_polymulmod(y, y, f, p), weights))] = 1
    d = torch.tensor(digits, dtype=torch.int32)  # [q, e]
    diff = (d[:, None, :] - d[None, :, :]) % p  # digit-wise subtraction in GF(p)^e
    return chi[(diff * torch.tensor(weights, dtype=torch.int32)).sum(-1)]


# ---- small Hadamard matrices ---------------------------------------------------------------------
def construction(k: int) -> str | None:
    """How a +-1 Hadamard matrix of order k is built here ("sylvester", "paley1 q=..",
    "paley2 q=..") or None if none of the constructions applies."""
    if k >= 1 and k & (k - 1) == 0:
        return "sylvester"
    if k > MAX_ORDER or k % 4:
        return None
    pe = prime_power(k - 1)
    if pe and (k - 1) % 4 == 3:
        return f"paley1 q={k - 1}"
    pe = prime_power(k // 2 - 1)
    if pe and (k // 2 - 1) % 4 == 1:
        return f"paley2 q={k // 2 - 1}"
    return None


@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=32)
def _hadamard_pm1(k: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of order k (float64), for k with a :func:`construction`."""
    how = construction(k)
    if how is None:
        raise PtqcError(f"no Hadamard construction for order {k}")
    if how == "sylvester":
        return _sylvester(k)
    q = int(how.split("q=")[1])
    j = _jacobsthal(q).double()
    ones = torch.ones(q, 1, dtype=torch.float64)
    paley1 = how.startswith("paley1")
    c = torch.cat([torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.t()], 1),
                   torch.cat([-ones if paley1 else ones, j], 1)], 0)
    if paley1:
        return torch.eye(q + 1, dtype=torch.float64) + c
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


# ---- public API ----------------------------------------------------------------------------------
def factor(n: int, what: str = "size", fix: str = "") -> tuple[int, int]:
    """``(k, 2^m)`` with ``n = k * 2^m`` and a Hadamard matrix of order k buildable here (the
    smallest such k). Raises PtqcError with one line naming ``what`` (e.g. "hidden size") and
    ``fix`` (e.g. "use residual=orthogonal") otherwise."""
    p2 = n & -n if n >= 1 else 0  # largest power of two dividing n
    tried = [n // (p2 >> i) for i in range(p2.bit_length())]  # k = n / 2^m, smallest first
    k = next((k for k in tried if construction(k) is not None), None)
    if k is not None:
        return k, n // k
    hint = f"; {fix}" if fix else ""
    raise PtqcError(f"{what} {n} has no Hadamard factorization k*2^m with k in {{1, 2, q+1 (q = 3 mod 4), "
                    f"2(q+1) (q = 1 mod 4); q a prime power, k <= {MAX_ORDER}}} "
                    f"(tried k = {', '.join(map(str, tried)) or 'none'}){hint}")


def hadamard(n: int, seed: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Hadamard matrix [n, n] (``H H^T = I``): ``(H_k kron S_{2^m}) / sqrt(n)``.
    With ``seed``, the randomized ``H diag(s)`` of :func:`random_hadamard`."""
    if seed is not None:
        return random_hadamard(n, seed, dtype)
    k, p2 = factor(n)
    return (torch.kron(_hadamard_pm1(k), _sylvester(p2)) / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``hadamard(n) diag(s)``, s random +-1 drawn from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return (hadamard(n) * s[None, :]).to(dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def kron_factors(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``(a, b)``, a [n1, n1], b [n2, n2], with ``a kron b == hadamard(n)`` and
    n1 + n2 as small as possible: a = (H_k kron S_{2^j}) / sqrt(n1), b = S_{2^(m-j)} / sqrt(n2)."""
    k, p2 = factor(n)
    best = None
    j = 1
    while j <= p2:  # a gets S_j, b gets S_{p2/j}
        n1, n2 = k * j, p2 // j
        if best is None or n1 + n2 < best[0] + best[1]:
            best = (n1, n2, j)
        j *= 2
    n1, n2, j = best
    a = torch.kron(_hadamard_pm1(k), _sylvester(j)) / math.sqrt(n1)
    b = _sylvester(n2) / math.sqrt(n2)
    return a.to(dtype), b.to(dtype)
