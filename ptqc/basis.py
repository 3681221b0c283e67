"""The basis a rotated model's values live in, so they can be compared with the float model's.

``rotate`` (QuaRot) keeps the float function but moves intermediate values into other bases
(see passes/rotate.py): the residual stream becomes ``h Q`` (the embedding output, every decoder
layer's output, and the outputs of the linears writing to it, o_proj and down_proj), and with
``v=true`` each head of v_proj's output becomes ``v_h Hd`` (Hd: the head_dim Hadamard). Online
transforms (rotate's Q/K and down_proj Hadamards, FlatQuant's Kronecker transforms) act on linear
*inputs* only, so no linear output or layer output moves because of them.

:meth:`Rotation.of` rebuilds Q and Hd from the rotate pass's record in the artifact's history
(its options and summary), so ``ptqc diagnose`` and ``ptqc diff`` can map a rotated model's
probes back (``to_float``) or map float layer inputs into the rotated basis (``to_rotated``).
"""
from __future__ import annotations

import torch

from ptqc import hadamard

WRITERS = ("o", "down")  # linears whose outputs land on the residual stream


class Rotation:
    def __init__(self, q: torch.Tensor, hv: torch.Tensor | None):
        self.q, self.hv = q.double(), None if hv is None else hv.double()

    @classmethod
    def of(cls, qm) -> "Rotation | None":
        """The residual rotation of ``qm`` (None when it was not rotated)."""
        rec = next((h for h in reversed(getattr(qm, "history", []) or []) if h.get("pass") == "rotate"), None)
        if rec is None:
            return None
        o, s = rec["options"], rec["summary"]
        n, seed = int(s["hidden"]), int(o.get("seed", 0))
        q = (hadamard.random_hadamard(n, seed) if o.get("residual", "hadamard") == "hadamard"
             else hadamard.random_orthogonal(n, seed))
        dims = [int(d) for d in (s.get("head_dim") or {})]
        hv = hadamard.hadamard(dims[0]) if o.get("v", True) and len(dims) == 1 else None
        return cls(q, hv)

    @property
    def hidden(self) -> int:
        return self.q.shape[0]

    def to_float(self, kind: str, role: str | None, y: torch.Tensor) -> torch.Tensor:
        """A probe of the rotated model in the float model's basis (``kind``: embed, layer,
        linear, logits; ``role`` of a linear: q, k, v, o, gate, up, down...)."""
        if kind in ("embed", "layer") or kind == "linear" and role in WRITERS:
            return (y.double() @ self.q.t()).to(y.dtype)
        if kind == "linear" and role == "v" and self.hv is not None:
            d = self.hv.shape[0]
            return (y.double().reshape(*y.shape[:-1], -1, d) @ self.hv.t()).reshape(y.shape).to(y.dtype)
        return y

    def to_rotated(self, y: torch.Tensor) -> torch.Tensor:
        """A residual-stream value of the float model in the rotated basis."""
        return (y.double() @ self.q).to(y.dtype)
