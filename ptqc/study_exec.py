"""Where a study's cells run: in this process, in N processes (``--jobs``) or as Ray tasks (``--ray``).

Every engine calls ``on_result(cell, result)`` in the driver as each cell finishes (in completion
order), so results are saved one by one and an interrupted study resumes. Ray is the scheduler
for ``--ray``: one task per cell (``num_cpus=1``), models resolved by their absolute paths, which
must be readable by every node (shared storage). ``--ray auto`` joins the running cluster,
``--ray ADDRESS`` the one at ADDRESS (``ray://host:10001`` or ``host:6379``), ``--ray local``
starts a runtime on this machine (``--jobs`` CPUs, default all) for the run.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from ptqc.errors import PtqcError
from ptqc.study_worker import run_cell

RAY_MISSING = "--ray needs Ray: pip install 'ptqc[ray]'"


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _lost(e: BaseException) -> dict:
    return {"status": "failed", "error": f"worker lost: {type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def serial(todo: list[dict], on_result) -> None:
    for c in todo:
        on_result(c, run_cell(c))


def pool(todo: list[dict], on_result, jobs: int) -> None:
    """``jobs`` processes, each with cpu_count // jobs torch threads. Forked where the platform can
    (the workers start with torch and the passes imported, as DataLoader workers), else spawned."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ex = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method), initializer=_threads,
                             initargs=(threads,))
    try:
        futures = {ex.submit(run_cell, c): c for c in todo}
        for f in as_completed(futures):
            try:
                res = f.result()
            except Exception as e:  # noqa: BLE001 - a dead worker fails its cell, not the study
                res = _lost(e)
            on_result(futures[f], res)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _ray_init(ray, address: str, jobs: int) -> bool:
    """Connect (or start a local runtime); True if this call started it."""
    if ray.is_initialized():
        return False
    kw = {"num_cpus": jobs} if address == "local" and jobs > 1 else {}
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise PtqcError(f"cannot connect to the Ray cluster at {address!r}: {' '.join(str(e).split())[:200]}") from None
    return True


def require_ray():
    try:
        import ray
    except ImportError:
        raise PtqcError(RAY_MISSING) from None
    return ray


def on_ray(todo: list[dict], on_result, address: str, jobs: int = 1) -> None:
    """One Ray task per cell; results handed over as tasks finish."""
    ray = require_ray()
    started = _ray_init(ray, address, jobs)
    task = ray.remote(num_cpus=1, max_retries=0)(run_cell)
    refs = {task.remote(c): c for c in todo}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                res = ray.get(done[0])
            except ray.exceptions.RayError as e:
                res = _lost(e)
            on_result(refs[done[0]], res)
    finally:
        for r in pending:
            ray.cancel(r, force=True)
        if started:
            ray.shutdown()


def execute(todo: list[dict], on_result, jobs: int = 1, ray: str | None = None) -> None:
    if ray:
        on_ray(todo, on_result, ray, jobs)
    elif jobs > 1 and len(todo) > 1:
        pool(todo, on_result, min(jobs, len(todo)))
    else:
        serial(todo, on_result)
