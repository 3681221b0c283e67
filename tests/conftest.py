import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_tiny_model import make_model  # noqa: E402

WORDS = ("the quick brown fox def return lambda class import from while for in if else "
         "value list dict tuple print module function").split()


def _write_text(path: Path, n_words: int, seed: int) -> None:
    rnd = random.Random(seed)
    path.write_text(" ".join(rnd.choice(WORDS) for _ in range(n_words)))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Token caches of the tests go to a temporary directory, not ~/.cache/ptqc."""
    import os

    old = os.environ.get("PTQC_CACHE")
    os.environ["PTQC_CACHE"] = str(tmp_path_factory.mktemp("ptqc-cache"))
    yield
    if old is None:
        os.environ.pop("PTQC_CACHE", None)
    else:
        os.environ["PTQC_CACHE"] = old


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny models: Qwen2 (GQA, q/k/v bias, 2 shards), Llama (MHA, tied embeddings),
    Mistral (sliding window 8). Each has an eval.txt."""
    root = tmp_path_factory.mktemp("models")
    out = {
        "qwen2": make_model(root / "qwen2", "qwen2", layers=2, shards=2),
        "llama": make_model(root / "llama", "llama", layers=2, kv_heads=4, tie=True, seed=1),
        "mistral": make_model(root / "mistral", "mistral", layers=2, sliding_window=8, seed=2),
    }
    for i, p in enumerate(out.values()):
        _write_text(p / "eval.txt", 1500, i)
    return out


@pytest.fixture(scope="session")
def loaded(models):
    """Canonical QModels, loaded once per session; tests that mutate must .clone() them."""
    from ptqc import frontend

    cache = {}

    def get(arch, dtype="float32"):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = frontend.load(models[arch], dtype)
        return cache[arch, dtype].clone()
    return get


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return lambda b, s, vocab=300: torch.randint(0, vocab, (b, s))
