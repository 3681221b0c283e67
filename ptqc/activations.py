"""Calibration activations on bounded memory: the per-batch values a :class:`ptqc.calib.LayerRunner`
carries from one decoder layer to the next, kept in memory up to a budget and on disk beyond it.

128 windows of 4096 tokens on an 8192-wide model is 16 GiB per buffer in float32: more than the
weights of one layer, the only other thing a streaming compile holds. :class:`Batches` is the list
of per-batch value dicts; once the batches in memory hold ``budget`` bytes, a batch assigned later
is written to a file in ``directory`` (``torch.save``) and read back memory-mapped when a segment
runs it, one batch at a time. The values come back bit for bit, so spilling never changes a result.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves


def nbytes(values) -> int:
    """Bytes of the tensors in ``values`` (any nesting of dicts, tuples and lists)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


def default_budget() -> int:
    """A quarter of the machine's physical memory, at least 1 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 << 30
    return max(ram // 4, 1 << 30)


class Batches:
    """A list of per-batch value dicts, in memory up to ``budget`` bytes and in files under
    ``directory`` beyond it (see module doc). Without a directory everything stays in memory.
    ``spilled`` counts the batches written to disk; the files go with the object."""

    def __init__(self, items=(), budget: int | None = None, directory: Path | None = None):
        self.budget = budget
        self._root = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self._mem: dict[int, dict] = {}
        self._files: dict[int, Path] = {}
        self._bytes = 0
        self._len = 0
        self.spilled = 0
        for b, values in enumerate(items):
            self._len = b + 1
            self[b] = values

    @classmethod
    def for_store(cls, store, items=(), reserved: int = 0) -> "Batches":
        """Batches under ``store``'s activation budget less ``reserved`` bytes held elsewhere,
        spilling to its offload directory (a store without them: all in memory)."""
        budget = getattr(store, "activation_bytes", None)
        return cls(items, None if budget is None else max(0, budget - reserved), getattr(store, "offload_dir", None))

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return (self[b] for b in range(self._len))

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(self._len))]
        b = range(self._len)[b]
        if b in self._mem:
            return self._mem[b]
        return torch.load(self._files[b], mmap=True, weights_only=False)

    def __setitem__(self, b: int, values: dict) -> None:
        b = range(self._len)[b]
        self._drop(b)
        size = nbytes(values)
        if self._root is None or self.budget is None or self._bytes + size <= self.budget:
            self._mem[b] = values
            self._bytes += size
        else:
            self._files[b] = self._write(b, values)
            self.spilled += 1

    def _drop(self, b: int) -> None:
        old = self._mem.pop(b, None)
        if old is not None:
            self._bytes -= nbytes(old)
        path = self._files.pop(b, None)
        if path is not None:
            path.unlink(missing_ok=True)  # a mapped reader keeps its pages (POSIX)

    def _write(self, b: int, values: dict) -> Path:
        if self._dir is None:
            self._root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f"acts-{os.getpid()}-", dir=self._root))
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        path = self._dir / f"batch-{b:06d}.pt"  # private to this process: no atomic rename needed
        torch.save(values, path)
        return path

    def in_memory(self) -> int:
        """Bytes of the batches held in memory."""
        return self._bytes
