"""Loading a Hugging Face causal LM directory without holding the model in memory.

The model is built on the meta device (only its non-persistent buffers, e.g. rotary
``inv_freq``, are real) and traced from there; weights stay in the safetensors files and are
read tensor by tensor through a :class:`WeightStore`. The input directory is only ever read.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import struct
from pathlib import Path

import torch

from ptqc.errors import PtqcError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Files of a model directory that are weights (not copied into artifacts as "other files").
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise PtqcError(f"unknown dtype {name!r}; use one of: {', '.join(DTYPES)}") from None


def load_config(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    """Read and validate ``config.json`` of a local model directory."""
    path = Path(model_dir)
    if not path.exists():
        raise PtqcError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise PtqcError(f"{path} is not a directory; pass a Hugging Face model directory")
    if not any(path.iterdir()):
        raise PtqcError(f"model directory {path} is empty")
    if not (path / "config.json").is_file():
        raise PtqcError(f"{path} has no config.json; pass a Hugging Face model directory")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PtqcError(f"cannot read {path / 'config.json'}: {e}") from None
    if "auto_map" in raw and not trust_remote_code:
        raise PtqcError(f"{path} uses custom (remote) code {raw.get('architectures')}; "
                        "rerun with --trust-remote-code if you trust it")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mtype = raw.get("model_type")
    if "auto_map" not in raw and mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PtqcError(f"unsupported architecture: model_type {mtype!r} is not a causal LM known to "
                        f"transformers (architectures {raw.get('architectures')})")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise PtqcError(f"cannot load config of {path}: {str(e).splitlines()[0]}") from None


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (single file or sharded index)."""
    index = sorted(model_dir.glob("*.safetensors.index.json"))
    files: dict[str, Path] = {}
    if index:
        try:
            wmap = json.loads(index[0].read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise PtqcError(f"cannot read the index {index[0]}: {e}") from None
        for name, fname in wmap.items():
            f = model_dir / fname
            if not f.is_file():
                raise PtqcError(f"{index[0].name} names {fname}, which is missing from {model_dir}")
            files[name] = f
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        other = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found {', '.join(other)}: convert it to safetensors first)" if other else ""
        raise PtqcError(f"no *.safetensors weights in {model_dir}{hint}")
    for f in shards:
        for name in SafetensorsFile(f).keys():
            files[name] = f
    return files


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Reads single tensors from a safetensors file with plain ``read()`` calls.

    Not ``mmap``: pages of a mapped file that were touched stay in the process's resident set
    until unmapped, so streaming a 30 GB checkpoint through one mapping would look (and, under
    memory pressure, behave) like holding it all. A read copies exactly one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PtqcError(f"{self.path} is not a readable safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self.base = 8 + n

    def keys(self):
        return self.entries.keys()

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        e = self.entries[name]
        return tuple(e["shape"]), _ST_DTYPES[e["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        start, end = e["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + start)
            view, got = memoryview(buf.numpy()), 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise PtqcError(f"{self.path} is truncated (tensor {name})")
                got += k
        return buf.view(_ST_DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(path: Path, names: list[str], spec, get, metadata: dict | None = None) -> int:
    """Write tensors one at a time (the file layout is computed from ``spec(name) -> (shape,
    dtype)`` first), so writing a checkpoint holds one tensor in memory. Returns bytes written."""
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    off = 0
    for n in names:
        shape, dtype = spec(n)
        nbytes = math.prod(shape) * dtype.itemsize
        header[n] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for n in names:
            t = get(n)
            shape, dtype = spec(n)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise PtqcError(f"tensor {n} is {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t  # before reading the next one: never two large tensors at once
    return off


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse a float tensor read from a checkpoint that holds NaN or infinity (one line naming it).
    The sum (no temporary the size of ``t``) is finite unless some value is not, or it overflows."""
    if t.is_floating_point() and not math.isfinite(float(t.sum(dtype=torch.float32))) \
            and not torch.isfinite(t).all():
        at = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise PtqcError(f"weight {name} has a non-finite value ({float(t[tuple(at)])}) at {at}; fix the checkpoint")


_SPILLS = itertools.count()


class WeightStore:
    """Tensors by name: read lazily from safetensors files, with an in-memory overlay.

    Passes read weights with ``store[name]`` and write new or changed tensors with
    ``store[name] = t``; the source files are never written. ``release()`` drops cached
    file tensors, so a caller streaming decoder layers keeps only one layer in memory.
    Float tensors read from files are cast to ``dtype``. Never modify a tensor from the store
    in place (clones of a QModel share tensors): compute a new one and assign it.

    Stacks: ``stacks[name]`` lists tensors read and stacked along a new first dimension under
    ``name`` (the per-expert tensors of an MoE expert stack, see :mod:`ptqc.moe`); ``slices[name]``
    = (source, start, stop) reads ``source[:, start:stop]`` (a stack of a fused checkpoint).

    Offloading: with ``offload_dir`` set, once the overlay (tensors written by passes) holds more
    than ``offload_bytes`` it is written to a safetensors file there and read back lazily, so a
    pass that quantizes a model larger than RAM never holds all its outputs. The calibration
    activations get their own budget, ``activation_bytes``, and spill into the same directory
    (:mod:`ptqc.activations`).
    """

    def __init__(self, files: dict[str, Path] | None = None, dtype: torch.dtype = torch.float32,
                 aliases: dict[str, str] | None = None, cache: bool = True):
        self.files = dict(files or {})
        self.dtype = dtype
        self.aliases = dict(aliases or {})
        self.cache = cache
        self.cast = True  # cast float tensors from files to `dtype` (False for artifacts)
        self.widen: set[str] = set()  # cast even so: an artifact's tensors kept as in their checkpoint
        self.overlay: dict[str, torch.Tensor] = {}
        self.stacks: dict[str, list[str]] = {}  # never mutated in place: clones share it
        self.slices: dict[str, tuple[str, int, int]] = {}  # likewise
        self.keep_dtype: set[str] = set()  # read as stored, not cast (float32 routers of bf16 models)
        self._cache: dict[str, torch.Tensor] = {}
        self._handles: dict[Path, SafetensorsFile] = {}
        self.offload_dir: Path | None = None
        self.offload_bytes = 256 << 20
        self.activation_bytes: int | None = None
        self._overlay_bytes = 0
        self.written: dict[str, int] = {}  # name -> number of writes (what a pass changed)

    def _resolve(self, name: str) -> str:
        return self.aliases.get(name, name) if name not in self.overlay else name

    def __contains__(self, name: str) -> bool:
        n = self._resolve(name)
        return n in self.overlay or n in self.files or n in self.stacks or n in self.slices

    def names(self) -> list[str]:
        return sorted(set(self.files) | set(self.overlay) | set(self.aliases) | set(self.stacks) | set(self.slices))

    def _handle(self, path: Path) -> SafetensorsFile:
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = SafetensorsFile(path)
        return h

    def __getitem__(self, name: str) -> torch.Tensor:
        n = self._resolve(name)
        if n in self.overlay:
            return self.overlay[n]
        if n in self._cache:
            return self._cache[n]
        if n not in self.files and n not in self.stacks and n not in self.slices:
            raise PtqcError(f"weight {name!r} is missing from the checkpoint")
        t = self._read(n) if n in self.files else self._read_stack(n) if n in self.stacks else self._read_slice(n)
        if self.cache:
            self._cache[n] = t
        return t

    def _read(self, n: str) -> torch.Tensor:
        t = self._handle(self.files[n]).read(n)
        if not self._is_spilled(n):
            check_finite(n, t)
        if self._casts(n) and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def _casts(self, n: str) -> bool:
        return (self.cast or n in self.widen) and not self._is_spilled(n) and n not in self.keep_dtype

    def checkpoint_dtype(self, name: str) -> torch.dtype | None:
        """The narrower float dtype a tensor no pass has written has in its checkpoint (bfloat16
        when a bfloat16 model is compiled in float32), else None: an artifact stores it so."""
        n = self._resolve(name)
        parts = self.stacks.get(n) or [self.slices[n][0] if n in self.slices else n]
        dtypes = set()
        for p in [n, *map(self._resolve, parts)]:
            if p in self.overlay or (p not in self.files and p != n) or (p in self.files and not self._casts(p)):
                return None
            if p in self.files:
                dtypes.add(self._handle(self.files[p]).spec(p)[1])
        dt = dtypes.pop() if len(dtypes) == 1 else None
        return dt if dt is not None and dt.is_floating_point and dt.itemsize < self.dtype.itemsize else None

    def _read_stack(self, n: str) -> torch.Tensor:
        """The stack of ``stacks[n]``, read part by part into one tensor (one part extra in memory)."""
        parts = self.stacks[n]
        shape, dtype = self.spec(n)
        out = torch.empty(shape, dtype=dtype)
        for i, p in enumerate(parts):
            t = self[p] if p in self.overlay or p in self._cache else self._read(self._resolve(p))
            if tuple(t.shape) != tuple(shape[1:]):
                raise PtqcError(f"weight {p} is {tuple(t.shape)}, unlike {parts[0]} {tuple(shape[1:])}")
            out[i] = t
        return out

    def _read_slice(self, n: str) -> torch.Tensor:
        src, start, stop = self.slices[n]
        t = self[src] if src in self.overlay or src in self._cache else self._read(self._resolve(src))
        return t[:, start:stop].contiguous()

    def configure_offload(self, directory: Path, budget_bytes: int | None = None) -> None:
        """Offload pass outputs to ``directory`` beyond ``budget_bytes`` in memory (default: 5 % of
        the checkpoint's files, within 16 MiB..1 GiB), and calibration activations beyond
        ``budget_bytes`` too (default: a quarter of the machine's memory)."""
        from ptqc.activations import default_budget

        self.activation_bytes = default_budget() if budget_bytes is None else budget_bytes
        if budget_bytes is None:
            size = sum(f.stat().st_size for f in set(self.files.values()))
            budget_bytes = min(max(size // 20, 16 << 20), 1 << 30)
        self.offload_dir = Path(directory)
        self.offload_bytes = budget_bytes

    def _is_spilled(self, n: str) -> bool:
        return self.offload_dir is not None and self.files.get(n, Path()).parent == self.offload_dir

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a tensor without reading its data."""
        n = self._resolve(name)
        if n in self.overlay:
            t = self.overlay[n]
            return tuple(t.shape), t.dtype
        if n in self._cache:
            t = self._cache[n]
            return tuple(t.shape), t.dtype
        if n not in self.files and n in self.stacks:
            shape, dtype = self.spec(self.stacks[n][0])
            return (len(self.stacks[n]), *shape), dtype
        if n not in self.files and n in self.slices:
            src, start, stop = self.slices[n]
            shape, dtype = self.spec(src)
            return (shape[0], stop - start, *shape[2:]), dtype
        if n not in self.files:
            raise PtqcError(f"weight {name!r} is missing from the checkpoint")
        shape, dtype = self._handle(self.files[n]).spec(n)
        if self._casts(n) and dtype.is_floating_point:
            dtype = self.dtype
        return shape, dtype

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        self.aliases.pop(name, None)  # writing a tied weight unties it
        self._cache.pop(name, None)  # the file version is superseded: free it
        old = self.overlay.get(name)
        if old is not None:
            self._overlay_bytes -= old.numel() * old.element_size()
        self.overlay[name] = t
        self.written[name] = self.written.get(name, 0) + 1
        self._overlay_bytes += t.numel() * t.element_size()
        if self.offload_dir is not None and self._overlay_bytes > self.offload_bytes:
            self.offload()

    def offload(self) -> None:
        """Move every overlay tensor to a new file in ``offload_dir`` (read back lazily)."""
        if self.offload_dir is None or not self.overlay:
            return
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        path = self.offload_dir / f"offload-{os.getpid()}-{next(_SPILLS):05d}.safetensors"
        names = sorted(self.overlay)
        write_safetensors(path, names, lambda n: (tuple(self.overlay[n].shape), self.overlay[n].dtype),
                          lambda n: self.overlay[n])
        for n in names:
            self.files[n] = path
        self.overlay.clear()
        self._overlay_bytes = 0

    def __delitem__(self, name: str) -> None:
        t = self.overlay.pop(name, None)
        if t is not None:
            self._overlay_bytes -= t.numel() * t.element_size()
        self._cache.pop(name, None)
        self.aliases.pop(name, None)
        self.files.pop(name, None)
        if name in self.stacks:
            self.stacks = {k: v for k, v in self.stacks.items() if k != name}
        if name in self.slices:
            self.slices = {k: v for k, v in self.slices.items() if k != name}

    def release(self, names=None) -> None:
        """Drop cached file tensors (all, or the given names); overlay tensors are kept."""
        if names is None:
            self._cache.clear()
        else:
            for n in names:
                self._cache.pop(self._resolve(n), None)

    def materialize(self, names) -> dict[str, torch.Tensor]:
        return {n: self[n] for n in names}


def steady_malloc() -> None:
    """Fix glibc's mmap threshold (4 MiB). By default it rises after every large free, so the
    next layers' tensors come from the heap and their memory is never given back: streaming
    a model layer by layer would then look like holding all of it."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 4 << 20)  # M_TRIM_THRESHOLD
        except (OSError, AttributeError):
            pass


@contextlib.contextmanager
def params_on_meta():
    """Construct modules with parameters on the meta device but real buffers (like
    accelerate's ``init_empty_weights(include_buffers=False)``): no weight memory, no init cost."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_meta_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """The transformers model with meta parameters and real buffers, in eval mode, SDPA attention
    (or, for models without SDPA such as Gemma 2, ptqc's own, :mod:`ptqc.families`)."""
    from transformers import AutoModelForCausalLM

    from ptqc.families import register_attention

    def build(impl):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                **({"attn_implementation": impl} if impl else {}))

    with params_on_meta():
        try:
            model = build("sdpa")
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "scaled_dot_product_attention" not in str(e):
                raise
            try:
                model = build(register_attention())
            except ValueError:  # no attention backends: its own (eager) attention
                model = build(None)
    return model.eval()


def other_files(model_dir: Path) -> list[Path]:
    """Non-weight files of a model directory (tokenizer, generation config, remote code...)."""
    return [p for p in sorted(model_dir.iterdir())
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.endswith(".safetensors.index.json") and p.name != "config.json"]


def hf_names(config) -> tuple[set[str], set[str]]:
    """(parameter and persistent buffer names, non-persistent buffer names such as rotary
    ``inv_freq``) of the transformers model of ``config``: what its state dict holds (named as the
    model names them; :func:`ptqc.families.model_key` maps a checkpoint name there), and what
    transformers recomputes."""
    import copy

    c = copy.deepcopy(config)
    if getattr(c, "quantization_config", None) is not None:
        c.quantization_config = None
    model = build_meta_model(c, torch.float32, bool(getattr(c, "auto_map", None)))  # custom code: already trusted
    persistent = set(model.state_dict(keep_vars=True))
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return params | persistent, {n for n, _ in model.named_buffers(remove_duplicate=False)} - persistent


def tensor_specs(files) -> dict[str, tuple[tuple, str]]:
    """{name: (shape, safetensors dtype string such as "I8")} of every tensor in these
    safetensors files, read from their headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple, str]] = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out
