#!/usr/bin/env python3
"""Train the tiny example models shipped in ``examples/`` (``tiny-qwen2``, ``tiny-qwen3-moe``).

Everything is built from text that exists on every machine with Python, so the
script needs no network access:

* ``pydoc_data.topics.topics`` (the ``help()`` topic pages), and
* the docstrings of the standard library (modules, classes, functions, methods),
  collected with ``inspect.getdoc`` and deduplicated.

Documents are split deterministically (by hashing a document id) into a training
set, a held-out evaluation text and a calibration text.  A byte-level BPE
tokenizer (tiny vocabulary, ``<|endoftext|>`` as EOS/BOS) is trained on the
training documents, then a small Qwen2 causal LM (or, with ``--arch qwen3_moe``, a
Qwen3-MoE one with a per-layer router load-balancing loss) is trained from scratch with
AdamW + warmup/cosine for a fixed number of steps (with a wall-clock safety cap).

The model is deliberately small-vocabulary and fairly deep so that it is
*sensitive to weight quantization*: every benchmark of the project runs on it and
must be able to tell quantization methods apart.

Usage::

    python tools/train_tiny_lm.py -o examples/tiny-qwen2
    python tools/train_tiny_lm.py -o examples/tiny-qwen3-moe --arch qwen3_moe --threads 1 \
        --layers 4 --hidden 128 --heads 4 --kv-heads 2 --moe-intermediate 256 \
        --no-bf16-autocast --steps 1200 --max-minutes 22

Output directory (written to a temporary sibling directory and renamed at the end):
``config.json``, ``generation_config.json``, ``model.safetensors`` (bfloat16),
``tokenizer.json``, ``tokenizer_config.json``, ``eval.txt``, ``calib.txt``,
``training_log.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import warnings

EOS = "<|endoftext|>"

# Modules never imported: side effects on import (browser, printing, GUI,
# terminal), test suites, Windows-only modules, and third-party-shadowed ones.
_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "_tkinter", "turtle", "turtledemo",
    "__hello__", "__phello__", "__main__", "test", "lib2to3", "ensurepip", "venv",
    "pydoc_data", "readline", "distutils", "msvcrt", "winreg", "winsound", "_winapi",
    "nt", "msilib", "_msi", "_overlapped", "_wmi", "_testcapi", "_testinternalcapi",
    "_testbuffer", "_testimportmultiple", "_testmultiphase", "_testsinglephase",
    "_testclinic", "_xxtestfuzz", "_ctypes_test", "xxlimited", "xxlimited_35",
    "xxsubtype", "_xxsubinterpreters", "_xxinterpchannels", "_xxsubinterpreters",
}
_ADDR_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def _is_skipped(modname: str) -> bool:
    parts = modname.split(".")
    if parts[0] in _SKIP_MODULES:
        return True
    for p in parts[1:]:
        if p.startswith("test") or p in ("tests", "idle_test", "__main__"):
            return True
    # one codec module per encoding: very repetitive boilerplate
    return parts[0] == "encodings" and len(parts) > 1


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _try_import(name: str):
    try:
        with _quiet():
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - anything (SystemExit included) means "skip"
        return None


def _stdlib_modules() -> list:
    """Import the standard library (top-level modules and sub-packages), sorted."""
    names = sorted(n for n in sys.stdlib_module_names if not _is_skipped(n))
    mods = {}
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in mods or _is_skipped(name):
            continue
        mod = _try_import(name)
        if mod is None:
            continue
        mods[name] = mod
        path = getattr(mod, "__path__", None)
        if path:
            try:
                subs = sorted(name + "." + info.name for info in pkgutil.iter_modules(path))
            except Exception:  # noqa: BLE001
                subs = []
            todo.extend(subs)
    return [mods[k] for k in sorted(mods)]


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError, RuntimeError):
        return ""
    except Exception:  # noqa: BLE001
        return ""
    if _ADDR_RE.search(sig) or len(sig) > 300:
        return ""  # object reprs with memory addresses are not reproducible
    return sig


def _getdoc(obj):
    try:
        doc = inspect.getdoc(obj)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(doc, str):
        return None
    doc = doc.strip()
    if len(doc) < 16 or _ADDR_RE.search(doc):
        return None
    return doc


def build_documents(min_chars: int = 16) -> list:
    """Return ``[(doc_id, text)]`` sorted by doc_id, deduplicated by docstring text."""
    from pydoc_data.topics import topics

    seen = set()
    docs = []

    def add(doc_id, header, body):
        body = body.replace("\r\n", "\n").strip()
        if len(body) < min_chars or body in seen:
            return
        seen.add(body)
        text = (header + "\n\n" + body) if header else body
        # documents are separated by blank lines in eval/calib text files, so
        # collapse runs of 3+ newlines inside a document
        text = re.sub(r"\n{3,}", "\n\n", text)
        docs.append((doc_id, text))

    for key in sorted(topics):
        add("topic:" + key, "", topics[key])

    for mod in _stdlib_modules():
        mname = mod.__name__
        doc = _getdoc(mod)
        if doc:
            add("module:" + mname, "Module " + mname, doc)
        try:
            members = sorted(vars(mod).items())
        except Exception:  # noqa: BLE001
            continue
        for aname, obj in members:
            if getattr(obj, "__module__", None) != mname:
                continue  # re-exports are documented where they are defined
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            qual = mname + "." + aname
            doc = _getdoc(obj)
            if doc:
                kind = "class " if inspect.isclass(obj) else ""
                add("obj:" + qual, kind + qual + _signature(obj), doc)
            if not inspect.isclass(obj):
                continue
            try:
                cmembers = sorted(vars(obj).items())
            except Exception:  # noqa: BLE001
                continue
            for cname, cobj in cmembers:
                if not (inspect.isroutine(cobj) or isinstance(cobj, (property, classmethod, staticmethod))):
                    continue
                doc = _getdoc(cobj)
                if doc:
                    sig = "" if isinstance(cobj, property) else _signature(cobj)
                    add("obj:" + qual + "." + cname, qual + "." + cname + sig, doc)
    docs.sort(key=lambda d: d[0])
    return docs


def split_documents(docs, eval_frac: float, calib_frac: float):
    train, ev, cal = [], [], []
    for doc_id, text in docs:
        h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64
        if h < eval_frac:
            ev.append((doc_id, text))
        elif h < eval_frac + calib_frac:
            cal.append((doc_id, text))
        else:
            train.append((doc_id, text))
    return train, ev, cal


# --------------------------------------------------------------------------- tokenizer

# Same normalizer / pre-tokenizer as transformers' Qwen2Tokenizer: AutoTokenizer
# rebuilds the tokenizer through that class for model_type "qwen2", so training
# with anything else would make the loaded tokenizer differ from the trained one.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=None,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- eval

def perplexity(model, ids, seqlen: int, batch: int = 16):
    """Standard protocol: non-overlapping windows of ``seqlen`` over the whole
    token stream, mean next-token NLL over all windows, exp."""
    import torch
    import torch.nn.functional as F

    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n, batch):
            x = windows[i:i + batch]
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                  x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count), n


# --------------------------------------------------------------------------- model

def build_config(args, vocab_size: int, eos_id: int):
    """The model config: Qwen2, or Qwen3-MoE (every layer sparse, top-k weights renormalized)."""
    from transformers import Qwen2Config, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=max(1024, args.seqlen), tie_word_embeddings=True,
                  bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True)
    if args.arch == "qwen2":
        return Qwen2Config(intermediate_size=args.intermediate, rope_theta=10000.0, **common)
    return Qwen3MoeConfig(intermediate_size=args.intermediate, num_experts=args.experts,
                          num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          router_aux_loss_coef=args.aux_loss_coef,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)


def layer_balance_loss(router_logits, experts: int, top_k: int):
    """Switch load-balancing loss of each layer, averaged (top_k when balanced).

    transformers' ``aux_loss`` pools the assignments of all layers before the product, so it
    reads as balanced when expert i of one layer is dead and expert i of another overloaded."""
    import torch
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    return torch.stack([load_balancing_loss_func((lg,), experts, top_k) for lg in router_logits]).mean()


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=13.0,
                   help="wall-clock budget for the training loop; training stops early "
                        "(and the LR schedule is compressed to it) if it runs out")
    p.add_argument("--steps", type=int, default=1800, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR / peak LR")
    p.add_argument("--warmup", type=int, default=60, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--arch", choices=["qwen2", "qwen3_moe"], default="qwen2")
    p.add_argument("--experts", type=int, default=8, help="qwen3_moe: routed experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="qwen3_moe: experts per token")
    p.add_argument("--moe-intermediate", type=int, default=256, help="qwen3_moe: expert FFN width")
    p.add_argument("--aux-loss-coef", type=float, default=0.01,
                   help="qwen3_moe: weight of the router load-balancing loss (per layer, averaged) "
                        "added to the LM loss")
    p.add_argument("--eval-frac", type=float, default=0.06)
    p.add_argument("--calib-frac", type=float, default=0.03)
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="train matmuls under CPU bfloat16 autocast (fp32 master weights); "
                        "~1.4x faster on CPUs with AVX512-BF16/AMX")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    out = os.path.abspath(args.output)
    if os.path.exists(out):
        if not os.path.isdir(out):
            sys.exit(f"error: {out} exists and is not a directory")
        if os.listdir(out) and not args.force:
            sys.exit(f"error: {out} is not empty (use --force to overwrite)")
    for name, v in (("hidden", args.hidden), ("intermediate", args.intermediate),
                    ("moe-intermediate", args.moe_intermediate)):
        if v % 128:
            sys.exit(f"error: --{name} must be a multiple of 128 (got {v})")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        sys.exit("error: hidden must divide by heads and heads by kv-heads")

    # ---- corpus (built before torch/transformers are imported) -------------
    docs = build_documents()
    train_docs, eval_docs, calib_docs = split_documents(docs, args.eval_frac, args.calib_frac)
    corpus_sha = hashlib.sha256("\x00".join(t for _, t in docs).encode()).hexdigest()
    print(f"[corpus] {len(docs)} documents, {sum(len(t) for _, t in docs)} chars "
          f"(train {len(train_docs)}, eval {len(eval_docs)}, calib {len(calib_docs)}), "
          f"sha256 {corpus_sha[:16]}  ({time.time() - t_start:.1f}s)", flush=True)

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    moe = args.arch == "qwen3_moe"
    from transformers import AutoModelForCausalLM, GenerationConfig

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    # ---- tokenizer ----------------------------------------------------------
    t0 = time.time()
    tok = train_tokenizer([t for _, t in train_docs], args.vocab)
    hf_tok = wrap_tokenizer(tok, model_max_length=131072)
    eos_id = tok.token_to_id(EOS)
    enc = tok.encode_batch([t for _, t in train_docs], add_special_tokens=False)
    stream = []
    for e in enc:
        stream.extend(e.ids)
        stream.append(eos_id)
    train_ids = torch.tensor(stream, dtype=torch.long)
    eval_text = "\n\n".join(t for _, t in eval_docs) + "\n"
    calib_text = "\n\n".join(t for _, t in calib_docs) + "\n"
    eval_ids = torch.tensor(hf_tok(eval_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    calib_ntok = len(hf_tok(calib_text, add_special_tokens=False)["input_ids"])
    n_chars = sum(len(t) for _, t in train_docs)
    print(f"[tokenizer] vocab {tok.get_vocab_size()}, train {train_ids.numel()} tokens "
          f"({n_chars / train_ids.numel():.2f} chars/token), eval {eval_ids.numel()} tokens "
          f"({eval_ids.numel() // args.seqlen} windows), calib {calib_ntok} tokens  "
          f"({time.time() - t0:.1f}s)", flush=True)

    # ---- model ----------------------------------------------------------------
    config = build_config(args, tok.get_vocab_size(), eos_id)
    # eager experts (a loop over experts): the fastest on CPU for training
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager") if moe \
        else AutoModelForCausalLM.from_config(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    ffn = (f"{args.experts} experts (top-{args.top_k}) of {args.moe_intermediate}" if moe
           else f"intermediate {args.intermediate}")
    print(f"[model] {args.arch} {n_params / 1e6:.2f}M params: {args.layers} layers, hidden {args.hidden}, "
          f"{ffn}, heads {args.heads}/{args.kv_heads} kv", flush=True)
    fwd = torch.compile(model) if args.compile else model

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=args.weight_decay)

    budget = args.max_minutes * 60.0

    def lr_at(progress: float, step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, max(0.0, progress))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    # data: epochs of shuffled non-overlapping windows of seqlen+1 tokens, random
    # start offset per epoch; every training token is used once per epoch.
    L = args.seqlen + 1
    gen = torch.Generator().manual_seed(args.seed)

    def epoch_windows():
        off = int(torch.randint(0, L, (1,), generator=gen))
        n = (train_ids.numel() - off) // L
        w = train_ids[off: off + n * L].view(n, L)
        return w[torch.randperm(n, generator=gen)]

    windows, wpos, epoch = epoch_windows(), 0, 0
    t_train = time.time()
    losses, log, step, stopped_early = [], [], 0, False
    lm_losses, aux_losses = [], []  # LM cross-entropy and router balance loss per step (MoE)
    # MoE: top-k assignments per [layer, expert] since the last log line; its smallest share is logged
    route_counts, min_shares = torch.zeros(args.layers, args.experts), []
    tokens_seen = 0
    time_driven_steps = 0  # steps whose LR came from the wall-clock fraction
    for step in range(args.steps):
        elapsed = time.time() - t_train
        if elapsed > budget:
            stopped_early = True
            break
        # schedule progress: step fraction, or time fraction if the machine is slower
        # than planned (so the LR still anneals before the wall-clock cap hits)
        prog_steps = (step - args.warmup) / max(1, args.steps - args.warmup)
        t_warm = log[0]["time"] if log else 0.0
        prog_time = (elapsed - t_warm) / max(1.0, budget - t_warm) if step >= args.warmup else 0.0
        time_driven_steps += step > args.warmup and prog_time > prog_steps
        lr = lr_at(max(prog_steps, prog_time), step)
        for g in opt.param_groups:
            g["lr"] = lr
        if wpos + args.batch > windows.size(0):
            windows, wpos, epoch = epoch_windows(), 0, epoch + 1
        x = windows[wpos: wpos + args.batch]
        wpos += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            res = fwd(input_ids=x[:, :-1], **({"output_router_logits": True} if moe else {}))
        logits = res.logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        lm_losses.append(loss.item())
        if moe:
            aux = layer_balance_loss(res.router_logits, args.experts, args.top_k)
            aux_losses.append(aux.item())
            with torch.no_grad():
                route_counts += torch.stack([torch.bincount(lg.topk(args.top_k, dim=-1).indices.reshape(-1),
                                                            minlength=args.experts) for lg in res.router_logits])
            loss = loss + args.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += x[:, 1:].numel()
        losses.append(lm_losses[-1])
        if step + 1 == args.warmup and not log:
            log.append({"step": step + 1, "time": time.time() - t_train})
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t_train
            avg = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            moe_log = ""
            if moe:
                min_shares.append(round((route_counts / route_counts.sum(-1, keepdim=True)).min().item(), 4))
                route_counts.zero_()
                moe_log = (f" aux {sum(aux_losses[-args.log_every:]) / len(aux_losses[-args.log_every:]):.3f}"
                           f" min-expert-share {min_shares[-1]:.3f}")
            print(f"[train] step {step + 1}/{args.steps} loss {avg:.4f}{moe_log} lr {lr:.2e} epoch {epoch} "
                  f"{el:.0f}s ({tokens_seen / max(el, 1e-9):.0f} tok/s)", flush=True)
    else:
        step = args.steps
    steps_done = len(losses)
    train_time = time.time() - t_train
    final_loss = sum(losses[-50:]) / max(1, len(losses[-50:]))
    print(f"[train] done: {steps_done} steps, {tokens_seen} tokens, {train_time:.0f}s, "
          f"final loss (last 50) {final_loss:.4f}{' (stopped by --max-minutes)' if stopped_early else ''}",
          flush=True)

    # ---- eval -----------------------------------------------------------------
    model.eval()
    ppl_fp32, n_win = perplexity(model, eval_ids, args.seqlen)
    save_dtype = getattr(torch, args.save_dtype)
    model.to(save_dtype)
    model.config.dtype = save_dtype
    # PPL of the weights as saved (rounded to save_dtype), computed in float32
    model.float()
    ppl_saved, _ = perplexity(model, eval_ids, args.seqlen)
    print(f"[eval] PPL {ppl_saved:.3f} on {n_win} windows of {args.seqlen} "
          f"(fp32 weights before rounding: {ppl_fp32:.3f})", flush=True)

    prompt = "Return the number of"
    pids = hf_tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        gout = model.generate(pids, max_new_tokens=48, do_sample=False, pad_token_id=eos_id)
    sample = hf_tok.decode(gout[0], skip_special_tokens=False)
    print(f"[sample] {sample!r}", flush=True)

    # ---- save (temp dir + rename) ---------------------------------------------
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".tmp-", dir=parent)
    try:
        model.to(save_dtype)
        model.config.dtype = save_dtype
        model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id,
                                                   pad_token_id=eos_id, do_sample=False)
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "eval.txt"), "w", encoding="utf-8") as f:
            f.write(eval_text)
        with open(os.path.join(tmp, "calib.txt"), "w", encoding="utf-8") as f:
            f.write(calib_text)
        # the tokenizer users get back must tokenize exactly like the one trained on
        from transformers import AutoTokenizer
        reloaded = AutoTokenizer.from_pretrained(tmp)
        if reloaded(eval_text, add_special_tokens=False)["input_ids"] != eval_ids.tolist():
            raise RuntimeError("AutoTokenizer.from_pretrained(out) tokenizes eval.txt differently "
                               "from the trained tokenizer")
        info = {
            "description": f"Tiny {'Qwen3-MoE' if moe else 'Qwen2'} trained from scratch on Python stdlib "
                           "docstrings + pydoc topics by tools/train_tiny_lm.py",
            "args": vars(args),
            "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                      "heads": args.heads, "kv_heads": args.kv_heads, "vocab": tok.get_vocab_size(),
                      "params": n_params, "tie_word_embeddings": True, "saved_dtype": args.save_dtype,
                      "arch": args.arch,
                      **({"experts": args.experts, "top_k": args.top_k,
                          "moe_intermediate": args.moe_intermediate,
                          "aux_loss_coef": args.aux_loss_coef} if moe else {})},
            "corpus": {"documents": len(docs), "train_documents": len(train_docs),
                       "eval_documents": len(eval_docs), "calib_documents": len(calib_docs),
                       "chars": sum(len(t) for _, t in docs), "sha256": corpus_sha,
                       "train_tokens": train_ids.numel(), "eval_tokens": eval_ids.numel(),
                       "calib_tokens": calib_ntok},
            "training": {"steps_planned": args.steps, "steps_done": steps_done,
                         "stopped_by_time_budget": stopped_early,
                         "schedule_time_driven_steps": time_driven_steps, "epochs": tokens_seen / train_ids.numel(),
                         "tokens_seen": tokens_seen, "batch": args.batch, "seqlen": args.seqlen,
                         "final_train_loss": final_loss, "train_seconds": round(train_time, 1),
                         **({"final_aux_loss": sum(aux_losses[-50:]) / max(1, len(aux_losses[-50:])),
                             "aux_loss_curve": [round(sum(aux_losses[i:i + 50]) / len(aux_losses[i:i + 50]), 4)
                                                for i in range(0, len(aux_losses), 50)],
                             "min_expert_share_curve": min_shares} if moe else {}),
                         "loss_curve": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 4)
                                        for i in range(0, len(losses), 50)]},
            "eval": {"protocol": f"non-overlapping windows of {args.seqlen} over eval.txt, mean NLL, exp",
                     "windows": n_win, "ppl": ppl_saved, "ppl_fp32_before_rounding": ppl_fp32},
            "sample": {"prompt": prompt, "greedy": sample},
            "wall_seconds": round(time.time() - t_start, 1),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "tokenizers": __import__("tokenizers").__version__},
        }
        with open(os.path.join(tmp, "training_log.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o755)
        for fn in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fn), 0o644)
        if os.path.exists(out):
            old = out + ".old-" + str(os.getpid())
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[done] wrote {out} in {time.time() - t_start:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
