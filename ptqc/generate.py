"""Greedy generation and collapse signals: does a quantized model still write text?

Perplexity can look acceptable while generation has collapsed into a loop ("the the the ...")
or a single token. :func:`greedy` continues a few prompts, :func:`collapse_signals` measures
the outputs and decides whether the model has collapsed.

The graph has no KV cache, so every step re-runs the whole sequence (O(n^2) in the length):
this is a reference check on a handful of short continuations, not a serving path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ptqc.errors import PtqcError

# Prefixes in the style of the example model's text (standard-library docstrings).
DEFAULT_PROMPTS = (
    "Return True if",
    "Return the number of",
    "Return a new",
    "This method is",
    "If there is",
    "Base class for",
)

# collapse rule (see collapse_signals); checked on examples/tiny-qwen2 and a forced-loop model
LOOP_MIN_REPEATS = 3  # a loop is a token sequence repeated back-to-back at least this often
LOOP_FRACTION = 0.5  # an output is "looping" when one loop covers this share of its tokens
FEW_TOKENS = 4  # ... or "degenerate" when its >= MIN_LEN tokens hold at most this many distinct ones
MIN_LEN = 8
DEGENERATE_OUTPUTS = 0.5  # collapsed when more than this share of outputs are looping or degenerate
MIN_DISTINCT_2 = 0.1  # ... or when distinct bigrams / bigrams falls below this
# gibberish (needs a reference text, e.g. the model's eval.txt): checked on examples/tiny-qwen2-outliers,
# float 0.99 vs static W8A8 (PPL 380, broken words, no loop) 0.19 of the words known
MIN_KNOWN_WORDS = 0.5  # collapsed when fewer of the generated words occur in the reference text
MIN_WORDS = 20  # ... judged only on at least this many words
WORD = re.compile(r"[A-Za-z]{2,}")


def vocabulary(text: str) -> set[str]:
    """The lower-cased words (2+ letters) of a reference text, for :func:`collapse_signals`."""
    return {w.lower() for w in WORD.findall(text)}


def reference_vocabulary(model_path, qm=None) -> set[str] | None:
    """:func:`vocabulary` of the model's held-out text (MODEL/eval.txt or its source's), or None."""
    from ptqc import evaluate

    try:
        return vocabulary(evaluate.read_text(evaluate.default_text(model_path, qm)))
    except PtqcError:
        return None


def read_prompts(path) -> list[str]:
    """One prompt per non-empty line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PtqcError(f"cannot read prompts file {p}: {e}") from None
    prompts = [x for x in lines if x.strip()]
    if not prompts:
        raise PtqcError(f"prompts file {p} has no prompts; write one prompt per line")
    return prompts


def eos_ids(tokenizer, model_dirs=()) -> set[int]:
    """The tokenizer's EOS id plus the ``eos_token_id`` of generation_config.json in ``model_dirs``."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for d in filter(None, model_dirs):
        f = Path(d) / "generation_config.json"
        if f.is_file():
            try:
                e = json.loads(f.read_text()).get("eos_token_id")
            except (OSError, json.JSONDecodeError):
                continue
            ids.update(int(x) for x in (e if isinstance(e, list) else [e]) if x is not None)
    return ids


@torch.no_grad()
def greedy_ids(qm, prompts: list[list[int]], max_new_tokens: int, eos: set[int] = frozenset(), device=None,
               stop=None) -> list[dict]:
    """Greedy continuation of token-id prompts of equal length (one batch).

    Returns per prompt ``ids`` (generated, without the EOS), ``reached_eos`` and ``finite``
    (False if the logits became NaN/inf; generation of that row stops there). ``stop(row, ids)``
    may end a row early (stop strings).
    """
    x = torch.tensor(prompts, dtype=torch.long)
    x = x.to(device) if device else x
    out = [{"ids": [], "reached_eos": False, "finite": True} for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = qm(x, device=device)[:, -1].float()
        nxt = logits.argmax(-1)
        finite = torch.isfinite(logits).all(-1).tolist()
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if not finite[i]:
                out[i]["finite"], done[i] = False, True
            elif t in eos:
                out[i]["reached_eos"], done[i] = True, True
            else:
                out[i]["ids"].append(t)
                done[i] = bool(stop and stop(i, out[i]["ids"]))
        if all(done):
            break
        x = torch.cat([x, nxt[:, None].to(x.dtype)], 1)
    return out


def max_positions(qm) -> int | None:
    return getattr(getattr(qm, "config", None), "max_position_embeddings", None)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt).input_ids
    if not ids:  # an empty prompt starts from BOS (or EOS, the usual document separator)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise PtqcError("an empty prompt needs a BOS or EOS token and the tokenizer has neither; give text")
        ids = [start]
    return list(ids)


def greedy(qm, tokenizer, prompts, max_new_tokens: int = 64, device=None, model_dir=None) -> list[dict]:
    """Greedy continuations of text prompts: ``prompt``, ``text``, ``ids``, ``reached_eos``, ``finite``.

    Prompts with the same token length run as one batch. EOS: the tokenizer's and those of
    generation_config.json in ``model_dir`` / the artifact's source model.
    """
    if max_new_tokens < 1:
        raise PtqcError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    eos = eos_ids(tokenizer, [model_dir, getattr(qm, "source", "")])
    enc = [encode_prompt(tokenizer, p) for p in prompts]
    limit = max_positions(qm)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        if limit and len(e) >= limit:
            raise PtqcError(f"prompt {i + 1} has {len(e)} tokens; the model takes at most {limit}")
        groups.setdefault(len(e), []).append(i)
    results: list[dict] = [{} for _ in prompts]
    for n, idx in groups.items():
        new = min(max_new_tokens, limit - n) if limit else max_new_tokens
        for i, r in zip(idx, greedy_ids(qm, [enc[i] for i in idx], new, eos, device)):
            results[i] = {"prompt": prompts[i], "text": tokenizer.decode(r["ids"], skip_special_tokens=True), **r}
    return results


def default_check(qm, tokenizer, model_dir, text_path, max_new_tokens: int = 64, device=None) -> dict:
    """:func:`collapse_signals` of greedy continuations of :data:`DEFAULT_PROMPTS`, the words judged
    against the text at ``text_path`` (``ptqc eval --generate``)."""
    from ptqc import evaluate

    outs = greedy(qm, tokenizer, list(DEFAULT_PROMPTS), max_new_tokens, device=device, model_dir=model_dir)
    return collapse_signals(outs, tokenizer, vocabulary(evaluate.read_text(text_path)))


# ---- collapse signals ----------------------------------------------------------------------
def longest_loop(ids: list[int], min_repeats: int = LOOP_MIN_REPEATS) -> dict:
    """The tandem repeat covering most tokens: a block of ``period`` tokens repeated back-to-back
    ``repeats >= min_repeats`` times. Returns period, repeats, tokens (period*repeats) and start."""
    best = {"period": 0, "repeats": 0, "tokens": 0, "start": 0}
    n = len(ids)
    for p in range(1, n // min_repeats + 1):
        run = 0  # ids[j-run .. j+p] has period p
        for j in range(n - p + 1):
            if j < n - p and ids[j] == ids[j + p]:
                run += 1
                continue
            reps = (run + p) // p
            if reps >= min_repeats and reps * p > best["tokens"]:
                best = {"period": p, "repeats": reps, "tokens": reps * p, "start": j - run}
            run = 0
    return best


def _distinct(seqs: list[list[int]], k: int) -> float | None:
    grams = [tuple(s[i: i + k]) for s in seqs for i in range(len(s) - k + 1)]
    return len(set(grams)) / len(grams) if grams else None


def collapse_signals(outputs: list[dict], tokenizer=None, vocab: set[str] | None = None) -> dict:
    """Collapse signals of greedy outputs and the verdict ``collapsed`` (with ``reasons``):
    ``eos_rate``, the longest ``loop``, the shares of ``looping`` and ``degenerate`` outputs (see
    the constants above), ``distinct_1``/``distinct_2`` over all generated tokens and, with
    ``vocab`` (:func:`vocabulary` of a reference text), ``known_words``: broken words ("thearal
    ripuil") neither loop nor repeat, so only this signal sees them. Healthy text keeps adding
    distinct tokens (the example model: >= 11 in any 16), so the per-output rules do not depend on
    the generation length; distinct_2 does (it falls slowly as outputs grow)."""
    seqs = [o["ids"] for o in outputs]
    loops = [longest_loop(s) for s in seqs]
    looping = [lp["tokens"] >= LOOP_FRACTION * len(s) and lp["tokens"] > 0 for lp, s in zip(loops, seqs)]
    degenerate = [lo or (len(s) >= MIN_LEN and len(set(s)) <= FEW_TOKENS) for lo, s in zip(looping, seqs)]
    worst = max(range(len(loops)), key=lambda i: loops[i]["tokens"], default=None)
    loop = dict(loops[worst]) if worst is not None else {"period": 0, "repeats": 0, "tokens": 0}
    if worst is not None and loop["tokens"]:
        loop["output"] = worst
        unit = seqs[worst][loop["start"]: loop["start"] + loop["period"]]
        if tokenizer is not None:
            loop["text"] = tokenizer.decode(unit)
    loop.pop("start", None)
    n = max(len(outputs), 1)
    s = {"outputs": len(outputs), "tokens": sum(map(len, seqs)),
         "eos_rate": sum(o["reached_eos"] for o in outputs) / n,
         "loop": loop, "looping": sum(looping) / n, "degenerate": sum(degenerate) / n,
         "distinct_1": _distinct(seqs, 1), "distinct_2": _distinct(seqs, 2),
         "finite": all(o.get("finite", True) for o in outputs)}
    reasons = []
    if not s["finite"]:
        reasons.append("non-finite logits during generation")
    if s["degenerate"] > DEGENERATE_OUTPUTS:
        reasons.append(f"{sum(degenerate)} of {len(outputs)} outputs are degenerate ({sum(looping)} mostly one "
                       f"repeated loop, longest {loop['period']} tokens x {loop['repeats']}; the others "
                       f"<= {FEW_TOKENS} distinct tokens)")
    if s["distinct_2"] is not None and s["distinct_2"] < MIN_DISTINCT_2:
        reasons.append(f"distinct-2 {s['distinct_2']:.3f} < {MIN_DISTINCT_2}")
    if outputs and s["tokens"] == 0 and s["finite"]:
        reasons.append("every output is empty (immediate EOS)")
    if vocab is not None:
        words = [w.lower() for o in outputs for w in WORD.findall(o.get("text") or "")]
        s["words"] = len(words)
        s["known_words"] = sum(w in vocab for w in words) / len(words) if words else None
        if len(words) >= MIN_WORDS and s["known_words"] < MIN_KNOWN_WORDS:
            reasons.append(f"only {s['known_words']:.0%} of the {len(words)} generated words occur in the reference "
                           f"text (< {MIN_KNOWN_WORDS:.0%}: gibberish)")
    s["collapsed"] = bool(reasons)
    s["reasons"] = reasons
    return s


def describe(s: dict) -> str:
    """One line summarizing :func:`collapse_signals`."""
    lp = s["loop"]
    loop = f"{lp['period']}x{lp['repeats']}" if lp["tokens"] else "none"
    d1 = "-" if s["distinct_1"] is None else f"{s['distinct_1']:.3f}"
    d2 = "-" if s["distinct_2"] is None else f"{s['distinct_2']:.3f}"
    kw = f"  known words {s['known_words']:.2f}" if s.get("known_words") is not None else ""
    return (f"eos {s['eos_rate']:.2f}  longest loop {loop}  looping {s['looping']:.2f}  "
            f"degenerate {s['degenerate']:.2f}  "
            f"distinct-1 {d1}  distinct-2 {d2}{kw}  {'COLLAPSED' if s['collapsed'] else 'ok'}")
