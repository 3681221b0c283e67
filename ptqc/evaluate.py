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
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # never prompt
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
               max_windows: int | None = None, progress=None, activation_budget: int = 1 << 30) -> dict:
    """PPL of ``qm`` on token ids (1-D) with non-overlapping windows.

    Runs layer by layer (:class:`ptqc.calib.LayerRunner`) over chunks of windows, so memory is
    one decoder layer of weights plus the chunk's hidden states (``activation_budget``), never
    the whole model; the numbers equal a plain full forward (tested)."""
    from ptqc.calib import LayerRunner

    w = windows(ids, seqlen)
    if max_windows:
        w = w[:max_windows]
    nll, count = 0.0, 0
    per_window = seqlen * getattr(qm.config, "hidden_size", 4096) * 4 * 4  # float32 hidden states, ~4 live copies
    chunk = max(batch_size, max(1, activation_budget // per_window) // batch_size * batch_size)
    chunks = list(torch.split(w, chunk))
    n_layers = None
    bar = progress(total=len(chunks) * (qm.num_layers + 2), desc="ppl", unit="segment") if progress else None
    for c in chunks:
        batches = list(torch.split(c, batch_size))
        runner = LayerRunner(qm, batches, device=device)
        keys = list(runner.freeze())
        n_layers = len(keys) - 2
        bad: list[int] = []

        def score(b, logits):
            nonlocal nll, count
            logits = logits.float()
            if not torch.isfinite(logits).all():
                bad.append(b)
                return
            t = batches[b].to(logits.device)
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += t[:, 1:].numel()

        for k in keys:
            runner.run(k, on_output=score if k == "suffix" else None)
            if bar is not None:
                bar.update(1)
        if bad:
            where = first_nonfinite(qm, batches[bad[0]][:1].to(device) if device else batches[bad[0]][:1], device)
            qm.store.release()
            raise CollapseError(f"collapse: non-finite logits; activations first became non-finite at {where}")
    if bar is not None:
        bar.close()
    mean = nll / count
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "windows": int(w.shape[0]),
            "seqlen": seqlen, "tokens": count, "layers": n_layers}


def unigram_perplexity(w: torch.Tensor) -> float:
    """PPL on windows ``w`` [n, seqlen] of the context-free predictor that knows the frequencies of
    the tokens it is scored on (the targets ``w[:, 1:]``): the best a model ignoring context can do
    on these windows, the "random" end for a near-random verdict (:mod:`ptqc.study_table`)."""
    t = w[:, 1:].reshape(-1)
    counts = torch.bincount(t).double()
    counts = counts[counts > 0]
    return math.exp(-(counts * (counts / t.numel()).log()).sum().item() / t.numel())


def perplexity_on(qm: QModel, ids: torch.Tensor, seqlen: int, target: str = "torch", *, batch_size: int = 8,
                  device=None, max_windows: int | None = None, progress=None, log=print) -> dict:
    """:func:`perplexity` computed by ``target``: torch (the ptqc graph), or a backend offering it
    (``onnx``, ``onnx-int``, ``ascend``: :mod:`ptqc.backends`); ``log(msg)`` gets its remarks."""
    if target == "torch":
        return perplexity(qm, ids, seqlen, batch_size=batch_size, device=device, max_windows=max_windows,
                          progress=progress)
    from ptqc import backends

    return backends.provider("eval_targets", target).perplexity(
        qm, ids, seqlen, target=target, batch_size=batch_size, max_windows=max_windows, device=device,
        progress=progress, log=log)
