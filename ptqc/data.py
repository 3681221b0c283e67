"""Calibration data: read texts from a local file or dataset, cut random token windows.

Sources (:func:`load_texts`):

* a text file (any suffix but the ones below): split into documents on blank lines;
* a JSON Lines file (``.jsonl``, or ``.json`` holding one object per line or one JSON array):
  each object's ``text_field``;
* a Parquet file (``.parquet``) or Arrow file (``.arrow``): the ``text_field`` column;
* a local dataset directory: its ``*.parquet`` files (a Hugging Face hub snapshot) or the
  ``*.arrow`` files written by ``datasets.save_to_disk``. When the directory holds several
  splits, only the ``train`` split is used if there is one. Nothing is ever downloaded.

Parquet and Arrow need pyarrow (``pip install 'ptqc[data]'``).

:func:`calibration_batches` follows GPTQ / llm-compressor: tokenize the documents once (joined
with a blank line) and draw ``n_samples`` random windows of ``seqlen`` tokens with a seeded
generator. Token ids are cached on disk (``$PTQC_CACHE/calib``, default
``~/.cache/ptqc/calib``) keyed by the data, the tokenizer and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ptqc.errors import PtqcError

DEFAULT_FIELD = "text"
CALIB_TEXT = "calib.txt"  # shipped next to example models
FIELD_HINT = "pass --calib-field with one of them"
_CACHE_VERSION = b"ptqc-calib-ids-v1"


# ---- reading texts -------------------------------------------------------------------------
def _pyarrow(what):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PtqcError(f"reading {what} needs pyarrow: install pyarrow (pip install 'ptqc[data]')") from None
    return pyarrow


def _read_utf8(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PtqcError(f"calibration file {p} is not UTF-8 text") from None
    except OSError as e:
        raise PtqcError(f"cannot read calibration file {p}: {e.strerror or e}") from None


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _field_value(obj, field: str, where: str):
    if not isinstance(obj, dict):
        raise PtqcError(f"{where} is not a JSON object; each record must be an object with a {field!r} field")
    if field not in obj:
        have = ", ".join(map(str, obj)) or "none"
        raise PtqcError(f"{where} has no {field!r} field (fields: {have}); {FIELD_HINT}")
    v = obj[field]
    if v is not None and not isinstance(v, str):
        raise PtqcError(f"{where}: field {field!r} is a {type(v).__name__}, not text; {FIELD_HINT}")
    return v


def _jsonl_texts(p: Path, field: str) -> list[str]:
    text = _read_utf8(p)
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise PtqcError(f"{p} is not valid JSON: {e}") from None
        return [_field_value(r, field, f"{p} record {i}") for i, r in enumerate(records)]
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PtqcError(f"{p} line {i} is not valid JSON ({e.msg}); expected one JSON object per line") from None
        out.append(_field_value(obj, field, f"{p} line {i}"))
    return out


def _read_table(pa, f: Path):
    """A pyarrow Table from a Parquet file or an Arrow IPC file (stream or file format)."""
    try:
        if f.suffix == ".parquet":
            return pa.parquet.read_table(str(f))
        with pa.memory_map(str(f)) as src:
            try:
                return pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                return pa.ipc.open_file(src).read_all()
    except (pa.ArrowException, OSError) as e:
        raise PtqcError(f"cannot read {f}: {str(e).splitlines()[0]}") from None


def _table_texts(files: list[Path], field: str, what: Path) -> list[str]:
    pa = _pyarrow(what)
    out = []
    for f in files:
        t = _read_table(pa, f)
        if field not in t.column_names:
            have = ", ".join(t.column_names) or "none"
            raise PtqcError(f"dataset {what} has no column {field!r} (columns: {have}); {FIELD_HINT}")
        col = t.column(field)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise PtqcError(f"column {field!r} of {what} holds {col.type}, not text; {FIELD_HINT}")
        out.extend(col.to_pylist())
    return out


def _train_only(files: list[Path], root: Path) -> list[Path]:
    """Keep the train split when a directory holds several (``train/``, ``data/train-*.parquet``)."""
    train = [f for f in files if any(part.startswith("train") for part in f.relative_to(root).parts)]
    return train or files


def data_files(path) -> list[Path]:
    """The files :func:`load_texts` reads for ``path`` (for a directory: its data files)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise PtqcError(f"calibration data {p} does not exist")
    for pattern in ("*.parquet", "*.arrow"):
        files = sorted(f for f in p.rglob(pattern)
                       if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))
        if files:
            return _train_only(files, p)
    raise PtqcError(f"{p} is a directory without *.parquet or *.arrow files; give a text, JSONL or Parquet "
                    "file, or a dataset directory written by datasets.save_to_disk")


def load_texts(path, text_field: str = DEFAULT_FIELD) -> list[str]:
    """The documents of a calibration source (see the module docstring), non-empty ones only."""
    p = Path(path)
    files = data_files(p)
    if p.is_dir() or p.suffix in (".parquet", ".arrow"):
        texts = _table_texts(files, text_field, p)
    elif p.suffix in (".jsonl", ".json"):
        texts = _jsonl_texts(p, text_field)
    else:
        texts = _paragraphs(_read_utf8(p))
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        if p.is_file() and p.suffix not in (".jsonl", ".json", ".parquet", ".arrow"):
            raise PtqcError(f"calibration file {p} is empty; give a file with text")
        raise PtqcError(f"calibration data {p} has no text: field {text_field!r} is empty in every record")
    return texts


# ---- token cache ---------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$PTQC_CACHE/calib`` if PTQC_CACHE is set, else ``~/.cache/ptqc/calib``."""
    root = os.environ.get("PTQC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ptqc") / "calib"


def tokenizer_identity(tokenizer) -> bytes:
    """Bytes that change whenever the tokenizer would tokenize differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):  # the full tokenizer.json
        body = backend.to_str()
    else:
        body = f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}"
    return f"{type(tokenizer).__name__}|{body}".encode()


def cache_key(files: list[Path], tokenizer, text_field: str) -> str:
    h = hashlib.sha256(_CACHE_VERSION)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    h.update(b"\0" + tokenizer_identity(tokenizer) + b"\0" + text_field.encode())
    return h.hexdigest()


def _cache_read(path: Path):
    try:
        t = torch.load(path, weights_only=True)
        return t if isinstance(t, torch.Tensor) and t.dim() == 1 else None
    except Exception:  # noqa: BLE001 - a missing or damaged cache entry is recomputed
        return None


def _cache_write(path: Path, ids: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(ids, tmp)
        os.replace(tmp, path)
    except OSError:  # read-only home, full disk...: run without the cache
        pass


def token_ids(tokenizer, path, text_field: str = DEFAULT_FIELD, cache_dir=None) -> torch.Tensor:
    """All documents of ``path`` joined with a blank line and tokenized once (1-D int64).

    ``cache_dir=False`` disables the cache; ``None`` uses :func:`default_cache_dir`.
    """
    from ptqc.evaluate import tokenize

    entry = None
    if cache_dir is not False:
        key = cache_key(data_files(path), tokenizer, text_field)
        entry = Path(cache_dir or default_cache_dir()) / f"{key}.pt"
        ids = _cache_read(entry)
        if ids is not None:
            return ids.long()
    ids = tokenize(tokenizer, "\n\n".join(load_texts(path, text_field))).long()
    if entry is not None:
        _cache_write(entry, ids.to(torch.int32))  # half the size; vocabularies fit in int32
    return ids


# ---- batches -------------------------------------------------------------------------------
def calibration_batches(tokenizer, path, n_samples: int, seqlen: int, seed: int = 0, cache_dir=None,
                        text_field: str = DEFAULT_FIELD) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens from ``path``: LongTensor [n_samples, seqlen].

    Window starts are drawn uniformly with ``torch.Generator().manual_seed(seed)``, so the same
    data, tokenizer and seed give the same batches. When the text has fewer than
    ``n_samples * seqlen`` tokens the windows overlap (the usual GPTQ sampling; fine for
    calibration statistics).
    """
    if n_samples < 1:
        raise PtqcError(f"--calib-samples {n_samples} must be at least 1")
    if seqlen < 2:
        raise PtqcError(f"--calib-seqlen {seqlen} is too small; use at least 2")
    ids = token_ids(tokenizer, path, text_field, cache_dir)
    n = ids.numel()
    if n < seqlen:
        raise PtqcError(f"calibration text {path} has {n} tokens; need at least {seqlen} (one window of "
                        f"--calib-seqlen {seqlen}); give more text or a smaller --calib-seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (n_samples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def default_calib(model_dir, qm=None) -> Path:
    """MODEL/calib.txt, else MODEL/eval.txt (also looked up in the artifact's source model)."""
    from ptqc.evaluate import DEFAULT_TEXT

    dirs = [Path(model_dir)] + ([Path(qm.source)] if qm is not None and getattr(qm, "source", "") else [])
    for name in (CALIB_TEXT, DEFAULT_TEXT):
        for d in dirs:
            if (d / name).is_file():
                return d / name
    raise PtqcError(f"no --calib given and {dirs[0]} has neither {CALIB_TEXT} nor {DEFAULT_TEXT}; "
                    "pass --calib FILE (text, JSONL, Parquet or a dataset directory)")
