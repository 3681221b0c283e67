"""Calibration data: every source format reads the same documents, windows are deterministic
random slices of the tokenized text, the token cache is used, errors are one clear line."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from ptqc import data, evaluate
from ptqc.errors import PtqcError

DOCS = ["def f(x): return x * 2  # the quick brown fox", "class A: value = 1\nprint(value)",
        "import module from list"]


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQC_CACHE", str(tmp_path / "cache"))  # never write to ~/.cache in tests


@pytest.fixture(scope="module")
def tok(models):
    return evaluate.load_tokenizer(models["qwen2"])


def _write_table(path, columns: dict, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(t, str(path))
        return
    with pa.OSFile(str(path), "wb") as f:
        w = pa.ipc.new_stream(f, t.schema) if fmt == "stream" else pa.ipc.new_file(f, t.schema)
        w.write_table(t)
        w.close()


def test_text_file_is_split_into_paragraphs(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(DOCS) + "\n  \n\n")
    assert data.load_texts(p) == DOCS
    (tmp_path / "c.md").write_text(DOCS[0])  # any other suffix is text too
    assert data.load_texts(tmp_path / "c.md") == DOCS[:1]


def test_jsonl_and_json(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    assert data.load_texts(p) == DOCS
    q = tmp_path / "c.json"
    q.write_text(json.dumps([{"body": d} for d in DOCS]))
    assert data.load_texts(q, "body") == DOCS


def test_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"content": "b", "id": 2}) + "\n")
    with pytest.raises(PtqcError, match=r"line 2 has no 'text' field \(fields: content, id\); pass --calib-field"):
        data.load_texts(p)
    p.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(PtqcError, match="line 2 is not valid JSON"):
        data.load_texts(p)
    p.write_text('{"text": 3}\n')
    with pytest.raises(PtqcError, match="'text' is a int, not text"):
        data.load_texts(p)


@pytest.mark.parametrize("fmt", ["parquet", "stream", "file"])
def test_dataset_directories(tmp_path, fmt):
    ext = "parquet" if fmt == "parquet" else "arrow"
    root = tmp_path / "ds"
    # a DatasetDict layout: the train split is used, the test split is ignored
    _write_table(root / "train" / f"data-00000-of-00002.{ext}", {"text": DOCS[:2], "n": [1, 2]}, fmt)
    _write_table(root / "train" / f"data-00001-of-00002.{ext}", {"text": DOCS[2:], "n": [3]}, fmt)
    _write_table(root / "test" / f"data-00000-of-00001.{ext}", {"text": ["held out"], "n": [0]}, fmt)
    (root / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    (root / "train" / "state.json").write_text("{}")
    assert data.load_texts(root) == DOCS
    assert data.load_texts(root / "test") == ["held out"]
    assert data.load_texts(root / "train" / f"data-00001-of-00002.{ext}") == DOCS[2:]
    with pytest.raises(PtqcError, match=r"has no column 'content' \(columns: text, n\); pass --calib-field"):
        data.load_texts(root, "content")
    with pytest.raises(PtqcError, match="column 'n' .* holds int64, not text"):
        data.load_texts(root, "n")


def test_missing_pyarrow_is_one_line(tmp_path, monkeypatch):
    _write_table(tmp_path / "d" / "x.parquet", {"text": DOCS}, "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(PtqcError, match=r"install pyarrow \(pip install 'ptqc\[data\]'\)"):
        data.load_texts(tmp_path / "d")


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "w.txt").write_text("\n \n\t\n")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    (tmp_path / "dir").mkdir()
    for name, msg in [("e.txt", "is empty"), ("w.txt", "is empty"), ("e.jsonl", "has no text"),
                      ("dir", "without \\*.parquet or \\*.arrow"), ("nope.txt", "does not exist")]:
        with pytest.raises(PtqcError, match=msg) as e:
            data.load_texts(tmp_path / name)
        assert "\n" not in str(e.value)


def test_windows_are_deterministic_slices(tok, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(DOCS * 20))
    ids = evaluate.tokenize(tok, "\n\n".join(DOCS * 20))
    a = data.calibration_batches(tok, p, 6, 16, seed=0)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_batches(tok, p, 6, 16, seed=0, cache_dir=False))
    assert not torch.equal(a, data.calibration_batches(tok, p, 6, 16, seed=1))
    for row in a:  # every window is a contiguous slice of the tokenized text
        assert any(torch.equal(row, ids[s: s + 16]) for s in range(ids.numel() - 15))
    # more samples than disjoint windows: windows overlap, still fine
    many = data.calibration_batches(tok, p, 4 * ids.numel() // 16, 16)
    assert many.shape[0] * 16 > ids.numel()


def test_too_few_tokens(tok, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(DOCS[0])
    n = evaluate.tokenize(tok, DOCS[0]).numel()
    with pytest.raises(PtqcError, match=f"has {n} tokens; need at least 512 \\(one window of --calib-seqlen"):
        data.calibration_batches(tok, p, 4, 512)
    assert data.calibration_batches(tok, p, 3, n).shape == (3, n)


class CountingTokenizer:
    """Delegates to a real tokenizer and counts (or forbids) tokenization calls."""

    def __init__(self, tok):
        self.tok, self.calls, self.forbid = tok, 0, False

    def __call__(self, *a, **kw):
        if self.forbid:
            raise AssertionError("tokenized although the cache should have been used")
        self.calls += 1
        return self.tok(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)


def test_token_cache(tok, tmp_path, monkeypatch):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in DOCS * 10))
    ct = CountingTokenizer(tok)
    first = data.calibration_batches(ct, p, 5, 8, cache_dir=tmp_path / "cc")
    assert ct.calls == 1 and len(list((tmp_path / "cc").glob("*.pt"))) == 1
    ct.forbid = True  # a second call must read the cache
    assert torch.equal(first, data.calibration_batches(ct, p, 5, 8, cache_dir=tmp_path / "cc"))
    ct.forbid = False
    data.calibration_batches(ct, p, 5, 8, cache_dir=tmp_path / "cc", text_field="text")
    p.write_text(p.read_text() + "\n" + json.dumps({"text": "more"}))  # new content: a new key
    data.calibration_batches(ct, p, 5, 8, cache_dir=tmp_path / "cc")
    assert ct.calls == 2
    # the default location follows PTQC_CACHE
    data.calibration_batches(ct, p, 5, 8)
    assert list((tmp_path / "cache" / "calib").glob("*.pt"))
    # a cache that cannot be written is skipped silently
    (tmp_path / "file").write_text("x")
    assert torch.equal(data.calibration_batches(ct, p, 5, 8, cache_dir=tmp_path / "file" / "sub"),
                       data.calibration_batches(ct, p, 5, 8, cache_dir=False))


def test_cache_key_depends_on_tokenizer_and_field(tok, models, tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("hello world")
    other = evaluate.load_tokenizer(models["llama"])  # same training text: same vocabulary
    other.backend_tokenizer.add_tokens(["hello"])
    k = data.cache_key([p], tok, "text")
    assert k == data.cache_key([p], evaluate.load_tokenizer(models["qwen2"]), "text")
    assert k != data.cache_key([p], other, "text")
    assert k != data.cache_key([p], tok, "body")


def test_default_calib(tmp_path):
    src, art = tmp_path / "src", tmp_path / "art"
    src.mkdir()
    art.mkdir()
    qm = SimpleNamespace(source=str(src))
    with pytest.raises(PtqcError, match="pass --calib FILE"):
        data.default_calib(art, qm)
    (src / "eval.txt").write_text("e")
    assert data.default_calib(art, qm) == src / "eval.txt"
    (src / "calib.txt").write_text("c")
    assert data.default_calib(art, qm) == src / "calib.txt"
    (art / "eval.txt").write_text("e")
    assert data.default_calib(art, qm) == src / "calib.txt"  # calib.txt anywhere beats eval.txt
    (art / "calib.txt").write_text("c")
    assert data.default_calib(art) == art / "calib.txt"
