"""The PassManager: checks a pipeline, runs it, and checks the graph after every pass.

Before anything runs, :func:`check_order` checks the whole pipeline's requires/provides/forbids.
After each pass the graph is linted (:func:`lint`) and every property the pass provides is
checked (``CHECKS``, like torch.fx's ``ensures``): e.g. after a pass that provides
``weight_quant`` every linear it selects must read a dequantize node. Each pass's record (time,
options, ops and weights changed, summary) goes to ``qm.history``.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter

from ptqc import mla, ops
from ptqc.errors import PtqcError
from ptqc.ir import is_op, propagate
from ptqc.pipeline import PASSES, Pass, PassContext, PassResult, load_builtin_passes
from ptqc.weights import plan


def check_order(passes: list[Pass], initial: set[str]) -> None:
    """Check the whole pipeline's requires/provides/forbids before anything runs."""
    load_builtin_passes()
    props = set(initial)
    for i, p in enumerate(passes):
        missing = sorted(set(p.requires) - props)
        if missing:
            providers = sorted(n for n, c in PASSES.items() if missing[0] in c.provides)
            hint = f"; run one of: {', '.join(providers)} before it" if providers else ""
            raise PtqcError(f"pass {p.name!r} requires {missing[0]!r}, which no earlier pass provides{hint}")
        clash = sorted(set(p.forbids) & props)
        if clash:
            earlier = [q.name for q in passes[:i] if clash[0] in q.provides]
            who = earlier[-1] if earlier else "an earlier step"
            raise PtqcError(f"pass {p.name!r} must run before {who!r} ({who} provides {clash[0]!r}); reorder the pipeline")
        props |= set(p.provides)


def lint(qm) -> None:
    """Structural and type checks of a QModel; raises PtqcError describing the first problem."""
    try:
        qm.graph.lint()
    except Exception as e:  # noqa: BLE001
        raise PtqcError(f"graph is malformed: {e}") from None
    for n in qm.graph.nodes:
        if n.op == "get_attr" and n.target not in qm.store:
            raise PtqcError(f"node {n.name} reads weight {n.target!r}, which is not in the weight store")
        if n.op == "call_function" and n.target == ops.LINEAR and "role" not in n.meta.get("ptqc", {}):
            raise PtqcError(f"linear {n.name} has no ptqc metadata (module/layer/role)")
    propagate(qm.graph, qm.store)


# ---- what a provided property means ----------------------------------------------------------
def _reads_float_weight(qm, p) -> list:
    return [n for n, _, spec in plan(qm, p) if spec is not None]


def _reads_float_input(qm, p) -> list:
    act = plan(qm, p, qm.linears(), spec_of=lambda mo: mo.act_spec() if hasattr(mo, "act_spec") else None)
    return [n for n, _, spec in act if spec is not None and not is_op(n.args[0], ops.QUANTIZE_ACT)]


def _float_cache(qm, p) -> list:
    def quantized(att):
        pts = mla.cache_points(att)  # MLA caches its latent (and rope key, optionally quantized), not K and V
        return mla.is_cache_quantized(pts[0]) if pts else all(is_op(a, ops.QUANTIZE_ACT) for a in att.args[1:3])
    return [n for n, _, _ in plan(qm, p, qm.nodes(ops.ATTENTION)) if not quantized(n)]


# property -> (nodes of the pass's selection that break it, what is wrong with them)
CHECKS = {
    "weight_quant": (_reads_float_weight, "still reads a float weight"),
    "act_quant": (_reads_float_input, "reads an unquantized input"),
    "kv_quant": (_float_cache, "reads an unquantized K or V"),
}


def check_provides(qm, p: Pass) -> None:
    """Does every property ``p`` provides hold? Checked on the modules the pass selects
    (``include``/``exclude``, precision plan, overrides); passes without a selection are trusted."""
    if not hasattr(p.options, "include"):
        return
    for prop in sorted(p.provides):
        if prop not in CHECKS:
            continue
        find, what = CHECKS[prop]
        bad = find(qm, p)
        if bad:
            first = bad[0].meta.get("ptqc", {}).get("module") or bad[0].name
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise PtqcError(f"after pass {p.name!r}: it provides {prop!r}, but {first} {what}{more}")


def _snapshot(qm) -> tuple[Counter, dict]:
    ops_count = Counter(_short(n.target) for n in qm.graph.nodes if n.op == "call_function")
    weights = {n.target: qm.store.written.get(n.target, 0) for n in qm.graph.nodes if n.op == "get_attr"}
    return ops_count, weights


def _short(target) -> str:
    s = str(target)
    return s.removesuffix(".default").removeprefix("aten.") if s.startswith(("aten.", "ptqc.")) else getattr(target, "__name__", s)


def _record(p: Pass, result: PassResult, seconds: float, before, after) -> dict:
    (before_ops, before_w), (after_ops, after_w) = before, after
    delta = {k: after_ops[k] - before_ops[k] for k in set(before_ops) | set(after_ops) if after_ops[k] != before_ops[k]}
    return {
        "pass": p.name,
        "options": dataclasses.asdict(p.options),
        **({"overrides": [[k, v if v is not None else "skip"] for k, v in p.overrides]}
           if getattr(p, "overrides", None) else {}),
        "seconds": round(seconds, 4),
        "changed": bool(result.changed),
        "ops_delta": dict(sorted(delta.items())),
        "weights_added": len(set(after_w) - set(before_w)),
        "weights_changed": sum(1 for k in set(after_w) & set(before_w) if after_w[k] != before_w[k]),
        "summary": result.summary,
    }


class PassManager:
    def __init__(self, passes: list[Pass], *, check: bool = True, dump_after=(), dump=None):
        self.passes = list(passes)
        self.check = check
        self.dump_after = set(dump_after)
        known = {p.name for p in self.passes} | {"all"}
        bad = sorted(self.dump_after - known)
        if bad:
            raise PtqcError(f"--dump-after {bad[0]!r} names no pass in the pipeline; use one of: {', '.join(sorted(known))}")
        self.dump = dump  # callable(index, pass, qm)

    def run(self, qm, ctx: PassContext | None = None) -> list[dict]:
        """Run the pipeline (see :meth:`iter_run`); returns the passes' records."""
        return list(self.iter_run(qm, ctx))

    def iter_run(self, qm, ctx: PassContext | None = None):
        """Check the pipeline's order, then run the passes, yielding each one's record as soon as
        it is done (after the graph was linted and the pass's properties checked)."""
        ctx = ctx or PassContext()
        check_order(self.passes, qm.properties)
        for i, p in enumerate(self.passes):
            before = _snapshot(qm)
            t0 = time.perf_counter()
            result = p.run(qm, ctx) or PassResult()
            seconds = time.perf_counter() - t0
            qm.properties = qm.properties | set(p.provides)
            if self.check:
                try:
                    lint(qm)
                except PtqcError as e:
                    raise PtqcError(f"after pass {p.name!r}: {e}") from None
                check_provides(qm, p)
            rec = _record(p, result, seconds, before, _snapshot(qm))
            qm.history.append(rec)
            if self.dump and (p.name in self.dump_after or "all" in self.dump_after):
                self.dump(i, p, qm)
            yield rec
