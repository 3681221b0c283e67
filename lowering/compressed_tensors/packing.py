"""compressed-tensors' ``pack-quantized`` layout: signed codes as a dense bit stream in int32 words."""
from __future__ import annotations

import torch

from ptqc.errors import PtqcError


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed ``bits``-bit codes (int8 [rows, cols]) as a dense little-endian bit stream in int32
    words along ``dim`` (1: [rows, ceil(cols*b/32)]; 0: [ceil(rows*b/32), cols])."""
    if codes.numel() and (codes.min() < -(1 << (bits - 1)) or codes.max() > (1 << (bits - 1)) - 1):
        raise PtqcError(f"codes outside the signed {bits}-bit range cannot be packed")
    v = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    words = -(-cols * bits // 32)
    out = torch.empty(rows, words, dtype=torch.int64)
    step = max(1, (1 << 22) // max(cols * bits, 1))  # bounded memory: a few MB per chunk
    for r in range(0, rows, step):
        c = v[r:r + step]
        stream = ((c.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(c.shape[0], cols * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
        out[r:r + step] = (stream.reshape(c.shape[0], words, 32) << torch.arange(32)).sum(-1)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    return out.T.contiguous() if dim == 0 else out


def unpack_int32(words: torch.Tensor, bits: int, shape, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 codes of ``shape`` ([rows, cols] of the unpacked tensor)."""
    w = words.T if dim == 0 else words
    rows, n = w.shape
    cols = int(shape[dim])
    out = torch.empty(rows, cols, dtype=torch.int8)
    step = max(1, (1 << 22) // max(n * 32, 1))
    for r in range(0, rows, step):
        u = w[r:r + step].to(torch.int64) & 0xFFFFFFFF
        stream = ((u.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(u.shape[0], n * 32)[:, :cols * bits]
        v = (stream.reshape(u.shape[0], cols, bits) << torch.arange(bits)).sum(-1) - (1 << (bits - 1))
        out[r:r + step] = v.to(torch.int8)
    return out.T.contiguous() if dim == 0 else out
