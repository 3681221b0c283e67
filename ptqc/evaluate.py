"""Perplexity with the protocol of GPTQ, AWQ, FlatQuant and llm-compressor.

Concatenate the text, tokenize it once, cut it into non-overlapping windows of ``seqlen``
tokens (the remainder is dropped), and report exp(mean next-token NLL over all windows).
Non-finite logits are never reported as a number: they raise :class:`CollapseError` naming
the first node whose output was not finite.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ptqc.errors import CollapseError, PtqcError
from ptqc.ir import QModel, execute

DEFAULT_TEXT = "eval.txt"  # shipped next to example models (and copied into artifacts)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise PtqcError(f"cannot load the tokenizer from {path}: {str(e).splitlines()[0]}") from None


def read_text(path) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PtqcError(f"text file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PtqcError(f"cannot read text file {p}: {e}") from None
    if not text.strip():
        raise PtqcError(f"text file {p} is empty")
    return text


def default_text(model_path, qm: QModel | None = None) -> Path:
    """The held-out text of a model: MODEL/eval.txt, or that of the artifact's source model."""
    cands = [Path(model_path) / DEFAULT_TEXT]
    if qm is not None and qm.source:
        cands.append(Path(qm.source) / DEFAULT_TEXT)
    for c in cands:
        if c.is_file():
            return c
    raise PtqcError(f"no --text given and {cands[0]} does not exist; pass --text FILE")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def windows(ids: torch.Tensor, seqlen: int, what: str = "text") -> torch.Tensor:
    if seqlen < 2:
        raise PtqcError(f"--seqlen {seqlen} is too small; use at least 2")
    n = ids.numel() // seqlen
    if n == 0:
        raise PtqcError(f"{what} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        f"give at least {seqlen} tokens or a smaller --seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def first_nonfinite(qm: QModel, ids: torch.Tensor, device=None) -> str:
    """Name the first node whose output is not finite (module path and layer)."""
    found = []

    class _Stop(Exception):
        pass

    def hook(node, val):
        if (node.op == "call_function" and isinstance(val, torch.Tensor) and val.is_floating_point()
                and not torch.isfinite(val).all()):
            found.append(node)
            raise _Stop

    try:
        execute(qm.graph, qm.store, {"input_ids": ids}, device=device, hook=hook)
    except _Stop:
        pass
    if not found:
        return "unknown node"
    n = found[0]
    m = n.meta.get("ptqc", {})
    return f"node {n.name} ({m.get('module') or '?'}, layer {m.get('layer')})"


@torch.no_grad()
def perplexity(qm: QModel, ids: torch.Tensor, seqlen: int, *, batch_size: int = 8, device=None,
               max_windows: int | None = None, progress=None) -> dict:
    """PPL of ``qm`` on token ids (1-D) with non-overlapping windows."""
    w = windows(ids, seqlen)
    if max_windows:
        w = w[:max_windows]
    nll, count = 0.0, 0
    batches = list(torch.split(w, batch_size))
    it = progress(batches, desc="ppl", unit="batch") if progress else batches
    for b in it:
        b = b.to(device) if device else b
        logits = qm(b, device=device).float()
        if not torch.isfinite(logits).all():
            where = first_nonfinite(qm, b[:1], device)
            raise CollapseError(f"collapse: non-finite logits; activations first became non-finite at {where}")
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += b[:, 1:].numel()
    mean = nll / count
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "windows": int(w.shape[0]),
            "seqlen": seqlen, "tokens": count}
