import os
import random
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one test process per core (pytest -n): one thread each, children too
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
EXAMPLES = ROOT / "examples"

from make_tiny_model import make_model  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

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


@pytest.fixture(scope="session", autouse=True)
def _private_hf_modules(tmp_path_factory):
    """transformers' dynamic-module cache (the code of remote-code models) in a temporary directory per
    test process, not ~/.cache/huggingface/modules: processes importing one model's code at once there
    collide (ModuleNotFoundError transformers_modules.<name>)."""
    import transformers.dynamic_module_utils as dm

    mp = pytest.MonkeyPatch()
    d = str(tmp_path_factory.mktemp("hf_modules"))
    mp.setenv("HF_MODULES_CACHE", d)
    mp.setattr(dm, "HF_MODULES_CACHE", d)
    yield
    mp.undo()


SHARED_TRACE_DIRS = {p.resolve() for p in EXAMPLES.iterdir() if p.is_dir()}  # + the `models` fixture's dirs
_TRACES: dict = {}


def _trace_key(path: Path, dtype, trust_remote_code, shapes):
    from ptqc.model import parse_dtype

    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    return path, dt, trust_remote_code, shapes, files


@pytest.fixture(scope="session", autouse=True)
def shared_traces():
    """frontend.load of a shared model directory (examples/, the `models` fixture's) traces it once per
    session and hands out clones (tracing costs seconds; a clone is the same graph and weights, see
    QModel.clone). Keyed by the directory's files (name, size, mtime), dtype, trust_remote_code, shapes;
    isolate=True, other directories and errors always run the real tracer. Yields the real loader
    for tests of loading itself."""
    from ptqc import frontend

    real = frontend.load

    def load(model_dir, dtype="float32", trust_remote_code=False, progress=False, isolate=False, shapes=True,
             supply=None):
        path = Path(model_dir).resolve()
        if isolate is True or path not in SHARED_TRACE_DIRS or supply:
            return real(model_dir, dtype, trust_remote_code, progress, isolate, shapes, supply)
        key = _trace_key(path, dtype, trust_remote_code, shapes)
        if key not in _TRACES:
            _TRACES[key] = real(model_dir, dtype, trust_remote_code, progress, isolate, shapes)
        return _TRACES[key].clone()

    frontend.load = load
    yield real
    frontend.load = real


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
        SHARED_TRACE_DIRS.add(p.resolve())
    return out


@pytest.fixture(scope="session")
def loaded(models, shared_traces):
    """Canonical QModels, traced once per session (shared_traces); each call gives a fresh clone."""
    from ptqc import frontend

    return lambda arch, dtype="float32": frontend.load(models[arch], dtype)


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return lambda b, s, vocab=300: torch.randint(0, vocab, (b, s))
