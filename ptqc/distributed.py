"""Data-parallel calibration on torch.distributed.

``ptqc compile --nproc N`` starts N ranks on this machine (:func:`spawn`, torch.multiprocessing);
under ``torchrun`` (RANK and WORLD_SIZE set) the same command joins the launched group
(:func:`init`). The backend comes from :func:`ptqc.device.dist_backend`. Every rank traces the
model and runs the same passes; rank 0 writes the artifact.

- Calibration windows are sharded: rank r feeds batches r, r+N, ... (:func:`shard`).
- Observers are reduced before a pass reads them (:func:`reduce`, rules in ``RULES``): sums,
  counts and Hessians by all_reduce SUM, maxima and minima by MAX / MIN (exact: bit-identical
  to one process), random row samples by gathering every rank's rows and keeping the k smallest
  keys. Float sums are reduced in another order than one process adds them.
- Per-linear work is split (:func:`split`): a dry run of the stage's items records each heavy
  call (``heavy``, e.g. one GPTQ), calls are assigned to ranks by greedy bin-packing on their cost,
  each rank computes its own, the results are broadcast, and every rank then runs the items
  with the results in hand, so all ranks hold the same graph and weights.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ptqc.errors import PtqcError


def world() -> tuple[int, int]:
    """(rank, number of ranks); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """Did a launcher (torchrun, :func:`spawn`) start this process as one of several ranks?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None) -> bool:
    """Join the process group the launcher (torchrun, :func:`spawn`) describes in the environment."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return dist.is_initialized()
    from ptqc.device import dist_backend

    dist.init_process_group(dist_backend(device))
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, nproc: int, port: int, threads: int | None, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    fn(*args)


def rank_threads(nproc: int) -> int | None:
    """Threads per spawned rank: this process's share of the cores (N ranks of all the cores each
    would oversubscribe them), unless OMP_NUM_THREADS says how many per process (torchrun's
    convention)."""
    return None if "OMP_NUM_THREADS" in os.environ else max(1, torch.get_num_threads() // nproc)


def spawn(nproc: int, fn, *args) -> int:
    """Run ``fn(*args)`` in ``nproc`` new processes forming one group; the first non-zero exit
    code of a rank (its error was printed by the rank), else 0."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(nproc, _free_port(), rank_threads(nproc), fn, args),
                             nprocs=nproc, join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    except mp.ProcessRaisedException as e:
        raise PtqcError(f"a rank failed: {str(e).strip().splitlines()[-1]}") from None
    return 0


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(batches: list) -> list:
    rank, n = world()
    return batches[rank::n]


# ---- reducing observers ------------------------------------------------------------------------
# class name (first match in the observer's MRO) -> {attribute: how its per-rank values combine}
RULES = {
    "AbsMax": {"value": "max"},
    "MinMax": {"min": "min", "max": "max"},
    "MeanAbs": {"sum": "sum"},
    "Hessian": {"sum": "sum"},
    "Percentile": {"sample": "bottom_k"},
    "Samples": {"sample": "bottom_k"},
    "ExpertHessians": {"counts": "sum", "h_in": "sum", "h_down": "sum", "all_in": "sum", "all_down": "sum"},
    "ExpertActs": {"counts": "sum", "routed": "acts", "every": "acts"},
}
OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _tensor(x, op: str):
    """x (a tensor, None on some ranks, or an int) combined over the ranks."""
    if isinstance(x, int):
        t = torch.tensor([x], dtype=torch.long)
        dist.all_reduce(t, OPS[op])
        return int(t)
    metas = [None] * world()[1]
    dist.all_gather_object(metas, None if x is None else (tuple(x.shape), x.dtype))
    meta = next((m for m in metas if m is not None), None)
    if meta is None:
        return None
    if x is None:
        fill = {"sum": 0, "max": float("-inf"), "min": float("inf")}[op]
        x = torch.full(meta[0], fill, dtype=meta[1])
    dist.all_reduce(x, OPS[op])
    return x


def _value(x, op: str):
    if isinstance(x, list):
        return [_value(v, op) for v in x]
    if op == "bottom_k":
        return x
    return _tensor(x, op)


def _bottom_k(o) -> None:
    """Every rank's sampled rows and their keys, the ``k`` smallest keys kept (rank order on ties)."""
    parts = [None] * world()[1]
    dist.all_gather_object(parts, (o.sample, o.keys))
    parts = [p for p in parts if p[0] is not None]
    if not parts:
        return
    rows, keys = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    k = getattr(o, "max_tokens", None) or o.max_values
    if keys.shape[0] > k:
        idx = keys.topk(k, largest=False).indices.sort().values
        rows, keys = rows[idx], keys[idx]
    o.sample, o.keys = rows, keys


def _acts(a) -> None:
    a.max, a.sum, a.n = _value(a.max, "max"), _value(a.sum, "sum"), _value(a.n, "sum")
    for s in (a.xs or []) + (a.hs or []):
        reduce(s)


def reduce(o) -> None:
    """Combine observer ``o``'s statistics over the ranks, in place (see module doc)."""
    rule = next((RULES[c.__name__] for c in type(o).__mro__ if c.__name__ in RULES), None)
    if rule is None:
        raise PtqcError(f"observer {type(o).__name__} has no rule to combine it over ranks; run without --nproc")
    if isinstance(getattr(o, "tokens", None), int):
        o.tokens = _tensor(o.tokens, "sum")
    for attr, how in rule.items():
        if how == "bottom_k":
            _bottom_k(o)
        elif how == "acts":
            if getattr(o, attr) is not None:
                _acts(getattr(o, attr))
        else:
            setattr(o, attr, _value(getattr(o, attr), how))


def reduce_stage(stage: dict) -> None:
    """Reduce every observer of ``stage`` ({node: {name: observer}}) when there are several ranks."""
    if world()[1] > 1:
        for named in stage.values():
            for o in named.values():
                reduce(o)


def reseed(stage: dict) -> None:
    """Observers drawing random keys (row samples) draw other keys on each rank."""
    rank, n = world()
    for named in stage.values():
        for o in named.values():
            if n > 1 and isinstance(getattr(o, "gen", None), torch.Generator):
                o.gen.manual_seed(o.gen.initial_seed() * n + rank)


# ---- splitting per-linear work ------------------------------------------------------------------
class _Dry(Exception):
    """A dry run of an item reached its first heavy call (or a commit): stop it there."""


class _Failed:
    def __init__(self, error: Exception):
        self.error = error


_split = {"mode": None, "calls": [], "results": []}


@contextmanager
def _mode(mode: str, results=()):
    _split.update(mode=mode, calls=[], results=list(results))
    try:
        yield
    finally:
        _split["mode"] = None


def heavy(fn, *args, cost: float = 1.0, stand_in=None):
    """``fn(*args)``, per-linear work :func:`split` may hand to another rank. In a dry run the
    call is recorded and the item stops here, or goes on with ``stand_in()`` (a cheap result of
    the same shape) if given; in the real run the owner's result is returned."""
    mode = _split["mode"]
    if mode == "dry":
        _split["calls"].append((fn, args, cost))
        if stand_in is None:
            raise _Dry
        return stand_in()
    if mode == "run" and _split["results"]:
        r = _split["results"].pop(0)
        if isinstance(r, _Failed):
            raise r.error
        return r
    return fn(*args)


def commit() -> None:
    """Called before a pass changes the model: a dry run stops here."""
    if _split["mode"] == "dry":
        raise _Dry


def pack(costs: list[float], n: int) -> list[int]:
    """Owner rank of each job: longest first, each to the least loaded rank (greedy bin-packing)."""
    load, owner = [0.0] * n, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: -costs[j]):
        r = min(range(n), key=lambda r: load[r])
        owner[j] = r
        load[r] += costs[j]
    return owner


def _owned(calls: list, owners: list, rank: int) -> dict:
    out = {}
    for (k, j, (fn, args, _)), r in zip(calls, owners):
        if r == rank:
            try:
                out[(k, j)] = fn(*args)
            except Exception as e:  # noqa: BLE001 - raised on every rank in the real run
                out[(k, j)] = _Failed(e)
    return out


def split(items: list) -> None:
    """Run ``items`` (callables, in order) with their heavy calls shared out over the ranks (module doc)."""
    rank, n = world()
    if n == 1:
        for f in items:
            f()
        return
    calls, finished = [], set()
    for k, f in enumerate(items):
        with _mode("dry"):
            try:
                f()
                if _split["calls"]:
                    raise PtqcError("internal: an item went on after a heavy call without committing")
                finished.add(k)  # no heavy call and no commit: it is done (on every rank alike)
            except _Dry:
                pass
            calls += [(k, j, c) for j, c in enumerate(_split["calls"])]
    owners = pack([c[2][2] for c in calls], n)
    results = _owned(calls, owners, rank)
    for (k, j, _), r in zip(calls, owners):
        box = [results.get((k, j))]
        dist.broadcast_object_list(box, src=r)
        results[(k, j)] = box[0]
    for k, f in enumerate(items):
        if k not in finished:
            with _mode("run", [results[(kk, j)] for kk, j, _ in calls if kk == k]):
                f()
