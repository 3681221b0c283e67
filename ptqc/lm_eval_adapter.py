"""lm-evaluation-harness tasks on a QModel (``ptqc eval PATH --tasks t1,t2``).

:func:`make_lm` wraps a QModel and its tokenizer as an ``lm_eval.api.model.LM``;
:func:`run_tasks` runs ``lm_eval.simple_evaluate`` on it and returns flat metrics
(``task/metric``). lm-eval is optional (``pip install 'ptqc[eval]'``) and runs offline: task
datasets must already be available locally (a local task YAML with ``dataset_path: json``, or
the Hugging Face datasets cache); nothing is downloaded.

The scoring math lives in plain functions that do not import lm_eval and follows lm-eval's
HF model (``HFLM``): a continuation is scored on ``context + continuation`` truncated on the
left to ``max_length + 1`` tokens (trailing spaces of the context move to the continuation);
rolling log-likelihoods cut the text into disjoint prediction windows of ``max_length`` tokens,
the first one conditioned on the BOS/EOS prefix token, later ones on as much of the preceding
text as fits (every token is scored exactly once; cf. the PPL protocol, which does not score
the first token of each window). The graph has no attention mask: batches are right-padded,
which a causal model never sees. Generation is greedy.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ptqc.errors import CollapseError, PtqcError

MAX_LENGTH = 2048  # context cap when the config allows more (logits are [batch, length, vocab])
MISSING = ("lm-eval is not installed: pip install 'ptqc[eval]' "
           "(tasks also need their datasets available locally; nothing is downloaded)")


# ---- plain scoring functions (no lm_eval import) -------------------------------------------
def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prefix_id(tokenizer) -> int:
    """The token a text with no context is conditioned on: BOS, else EOS (as lm-eval's HFLM)."""
    t = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if t is None:
        raise PtqcError("the tokenizer has neither a BOS nor an EOS token; lm-eval tasks need one")
    return t


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval splits them."""
    if not context:
        cont = encode(tokenizer, continuation)
        p = prefix_id(tokenizer)
        return ([p], cont) if not cont or cont[0] != p else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score(qm, pairs: list[tuple[list[int], list[int]]], max_length: int, batch_size: int = 8,
          device=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per token-id pair."""
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            results[i] = (0.0, True)
            continue
        if len(cont) > max_length:
            raise PtqcError(f"a continuation of {len(cont)} tokens is longer than the model's context {max_length}")
        rows.append((i, (ctx + cont)[-(max_length + 1):][:-1], cont))
    rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch
    for b in range(0, len(rows), batch_size):
        chunk = rows[b: b + batch_size]
        width = len(chunk[0][1])
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, (_, inp, _) in enumerate(chunk):
            x[j, : len(inp)] = torch.tensor(inp)
        logits = qm(x.to(device) if device else x, device=device).float()
        if not torch.isfinite(logits).all():
            raise CollapseError("collapse: non-finite logits while scoring lm-eval requests")
        for j, (i, inp, cont) in enumerate(chunk):
            lp = F.log_softmax(logits[j, len(inp) - len(cont): len(inp)], -1).cpu()
            target = torch.tensor(cont)
            results[i] = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
    return results  # type: ignore[return-value]


def rolling_pairs(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows scoring every token once (lm-eval, context_len=1)."""
    out = [([prefix], tokens[:max_length])] if tokens else []
    for done in range(max_length, len(tokens), max_length):
        end = min(done + max_length, len(tokens))
        out.append((tokens[max(0, end - max_length - 1): done], tokens[done:end]))
    return out


def rolling_loglikelihood(qm, tokenizer, texts: list[str], max_length: int, batch_size: int = 8,
                          device=None) -> list[float]:
    """Total log-likelihood of each text (all windows of one text summed)."""
    pairs, owner = [], []
    for k, t in enumerate(texts):
        w = rolling_pairs(encode(tokenizer, t), prefix_id(tokenizer), max_length)
        pairs += w
        owner += [k] * len(w)
    totals = [0.0] * len(texts)
    for k, (lp, _) in zip(owner, score(qm, pairs, max_length, batch_size, device)):
        totals[k] += lp
    return totals


def generate_until(qm, tokenizer, context: str, until, max_gen_toks: int, max_length: int, eos=(),
                   device=None) -> str:
    """Greedy continuation of ``context``, cut at the first stop string of ``until``."""
    from ptqc.generate import greedy_ids

    stops = [until] if isinstance(until, str) else [s for s in (until or []) if s]
    ctx = encode(tokenizer, context) or [prefix_id(tokenizer)]
    ctx = ctx[-max(1, max_length - max_gen_toks):]

    def stop(_row, ids):
        return any(s in tokenizer.decode(ids) for s in stops)

    [r] = greedy_ids(qm, [ctx], min(max_gen_toks, max_length - len(ctx)), set(eos), device, stop)
    text = tokenizer.decode(r["ids"], skip_special_tokens=True)
    for s in stops:
        text = text.split(s)[0]
    return text


# ---- lm-eval ---------------------------------------------------------------------------------
def require():
    """Import lm_eval offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set first) or raise PtqcError."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap would fork the model
    try:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True  # read at import time; transformers imported it already
    except ImportError:
        pass
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise PtqcError(MISSING) from None
    return lm_eval


def make_lm(qm, tokenizer, batch_size: int = 8, device=None, max_length: int | None = None, model_dir=None):
    """An ``lm_eval.api.model.LM`` scoring with ``qm``."""
    require()
    from lm_eval.api.model import LM

    from ptqc.generate import eos_ids, max_positions

    class PtqcLM(LM):
        def __init__(self):
            super().__init__()
            self.qm, self.tokenizer, self.batch_size, self.dev = qm, tokenizer, batch_size, device
            self.max_length = max_length or min(max_positions(qm) or MAX_LENGTH, MAX_LENGTH)
            self.eos = eos_ids(tokenizer, [model_dir, getattr(qm, "source", "")])

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [encode_pair(self.tokenizer, *r.args) for r in requests]
            return score(self.qm, pairs, self.max_length, self.batch_size, self.dev)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return rolling_loglikelihood(self.qm, self.tokenizer, [r.args[0] for r in requests], self.max_length,
                                         self.batch_size, self.dev)

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:
                context, kw = r.args
                kw = dict(kw or {})
                out.append(generate_until(self.qm, self.tokenizer, context, kw.get("until"),
                                          int(kw.get("max_gen_toks", 256)), self.max_length, self.eos, self.dev))
            return out

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "ptqc")).replace("/", "__")

    return PtqcLM()


def task_manager(names, include_path=None):
    """An lm-eval TaskManager that knows ``names``. Indexing lm-eval's built-in tasks takes ~10 s,
    so when every name is a local task of ``include_path`` only those are indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path] if include_path else None
    if paths:
        try:
            local = TaskManager(include_path=paths, include_defaults=False)
            if all(n in local.all_tasks for n in names):
                return local
        except TypeError:  # an lm-eval without include_defaults
            pass
    return TaskManager(include_path=paths)


def load_task(tm, name: str):
    """Build one task (this loads its dataset); a PtqcError naming the task if that fails."""
    import warnings

    from lm_eval.tasks import get_task_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return get_task_dict([name], tm)
    except Exception as e:  # noqa: BLE001 - datasets/hub raise many kinds when offline
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PtqcError(f"lm-eval task {name!r}: its dataset is not available locally ({first}); "
                        "nothing is downloaded: put it in the Hugging Face datasets cache or use a "
                        "local task YAML") from None


def flatten(results: dict) -> dict:
    """``{"task/metric": value}`` from simple_evaluate's ``results`` (filter "none" dropped)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, v in metrics.items():
            if key == "alias" or not isinstance(v, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            flat[f"{task}/{metric}" + (f"/{filt}" if filt and filt != "none" else "")] = v
    return flat


def run_tasks(qm, tokenizer, tasks, limit=None, *, batch_size: int = 8, device=None, include_path=None,
              num_fewshot: int | None = None, model_dir=None) -> dict:
    """Run lm-eval tasks (names, or a comma-separated string) on ``qm``; flat metrics."""
    lm_eval = require()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise PtqcError("--tasks is empty; give task names separated by commas")
    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = task_manager(names, include_path)
    for name in names:
        if name not in tm.all_tasks:
            raise PtqcError(f"unknown lm-eval task {name!r}; list them with 'lm-eval ls tasks' "
                            "(for a local task YAML add its directory with --include-path)")
        load_task(tm, name)  # fail here, per task, with its name
    lm = make_lm(qm, tokenizer, batch_size, device, model_dir=model_dir)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                  task_manager=tm, log_samples=False, bootstrap_iters=1000,
                                  verbosity="WARNING")
    return flatten(res or {})
