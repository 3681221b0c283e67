#!/usr/bin/env python3
"""Check the CPU emulation of the Ascend kernels against the real ones, node by node.

Run on an Ascend machine (torch_npu + CANN, e.g. a 910B), in one command::

    python tools/ascend_check.py OUT [--seqlen 128 --windows 2 --device npu:0 --dtype float16]

It loads the artifact ``OUT``, lowers it for Ascend in memory (``ptqc.lowering.ascend.lower``,
``fallback=true`` so a partly lowerable graph still runs; ``--lower fuse=false,...`` passes other
options; an artifact compiled with the ``ascend`` pass is used as it is) and runs that one
lowered graph twice, in lockstep, on ``--windows`` token windows of ``--seqlen`` tokens (the
artifact's calibration text, or ``--text``):

* **A** with inputs and weights on ``--device`` (an NPU: every ``ptqc_npu`` op calls its
  torch_npu kernel; aten ops run on the NPU too);
* **B** on the CPU: every ``ptqc_npu`` op runs its documented emulation.

For every ``call_function`` node, in graph order, a row compares B with A (A is the reference):

* ``max_abs`` / ``max_rel`` / ``SQNR dB`` (as in ``ptqc diff``; a tuple output reports its
  worst float element) and ``int_mism``, the number of integer elements (int8 codes, int32
  accumulators, int64 scales) that differ. These are **accumulated**: each side runs on its own
  values, so they include everything upstream.
* for ``ptqc_npu`` ops also a **local** check (``local SQNR`` / ``local_mism``): the emulation
  run on A's inputs of that node (moved to the CPU) against A's output. This isolates the
  kernel: an upstream float op that rounds differently on the NPU flips int8 codes downstream,
  which the accumulated numbers show but the local ones do not.

A node that raises on one side (e.g. a torch_npu kernel refusing a layout) is reported with
the error and the run goes on with the other side's value.

Summary: the first node whose accumulated values diverge beyond the tolerance, and the
``ptqc_npu`` ops that fail the local check. Exit status 1 if any ``ptqc_npu`` op fails the local
check (more than ``--max-mismatch`` integer elements differ, a float output under
``--min-sqnr`` dB, or a shape differs; with ``--strict`` the accumulated values count too) or
any node raised on one side, 0 otherwise, 2 for a user error (one line), e.g. no torch_npu /
NPU on this machine.

``--device cpu`` runs both sides on the CPU (emulation against emulation: exact by
construction) and additionally compares the fake-quant reference graph with the lowered one
(``ptqc diff OUT OUT:ascend``: the probes of every linear, decoder layer and the logits), so the
script is testable without an NPU. ``--reference`` adds that comparison on an NPU as well.

``--dtype float16|bfloat16`` runs an artifact compiled in another dtype in that one: float
tensors named ``*.weight`` / ``*.bias`` (model parameters) are cast, quantization parameters
(scales, zero points) are kept in float32, as when compiling in that dtype.

torch_npu is imported only when an ``npu`` device is asked for (importing it without the CANN
toolkit breaks torch); nothing is set globally at import. ``--json FILE`` (``-`` for stdout)
writes the rows and the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMAT = "ptqc-ascend-check"
VERSION = 1


class UserError(Exception):
    pass


# ---- comparison of one node's values ------------------------------------------------------------
def _leaves(v):
    if isinstance(v, (tuple, list)):
        out = []
        for x in v:
            out.extend(_leaves(x))
        return out
    return [v]


class NodeStats:
    """Running comparison of one node's outputs (all leaves of a tuple output) over windows."""

    def __init__(self):
        from ptqc.diff import Acc

        self._acc = Acc
        self.floats: dict[int, Acc] = {}
        self.int_mism = 0
        self.int_numel = 0
        self.int_max_abs = 0.0
        self.other_mism = 0
        self.shape: str | None = None

    def update(self, x, y) -> None:
        import torch

        lx, ly = _leaves(x), _leaves(y)
        if len(lx) != len(ly):
            self.shape = f"{len(lx)} vs {len(ly)} outputs"
            return
        for j, (a, b) in enumerate(zip(lx, ly)):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                a, b = a.detach().cpu(), b.detach().cpu()
                if a.shape != b.shape or a.dtype.is_floating_point != b.dtype.is_floating_point:
                    self.shape = self.shape or f"output {j}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
                    continue
                if a.dtype.is_floating_point or a.dtype.is_complex:
                    self.floats.setdefault(j, self._acc()).update(a, b, f"output {j}")
                else:
                    d = a.to(torch.int64) - b.to(torch.int64) if a.dtype != torch.bool else (a != b).to(torch.int64)
                    self.int_mism += int((d != 0).sum())
                    self.int_numel += d.numel()
                    if d.numel():
                        self.int_max_abs = max(self.int_max_abs, float(d.abs().max()))
            elif not (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
                self.other_mism += int(a != b)
            else:
                self.shape = self.shape or f"output {j}: {type(a).__name__} vs {type(b).__name__}"

    def metrics(self) -> dict:
        from ptqc.diff import sqnr_value

        ms = [a.metrics() for a in self.floats.values()]
        worst = min(ms, key=sqnr_value) if ms else None
        max_abs = max([self.int_max_abs] * bool(self.int_numel) + [m["max_abs"] for m in ms if m["finite"]],
                      default=None)
        return {
            "max_abs": max_abs,
            "max_rel": max((m["max_rel"] for m in ms if m["finite"]), default=None),
            "sqnr_db": None if worst is None else worst["sqnr_db"],
            "float_exact": None if worst is None else all(m["exact"] for m in ms),
            "finite": all(m["finite"] for m in ms),
            "int_mismatch": self.int_mism if self.int_numel else None,
            "int_numel": self.int_numel,
            "other_mismatch": self.other_mism,
            "shape_mismatch": self.shape,
        }


def _bad(m: dict, min_sqnr: float, max_mismatch: int) -> str | None:
    """Why these metrics are beyond tolerance (None if they are not)."""
    if m["shape_mismatch"]:
        return f"shape differs ({m['shape_mismatch']})"
    if not m["finite"]:
        return "non-finite values"
    if m["int_mismatch"] is not None and m["int_mismatch"] > max_mismatch:
        return f"{m['int_mismatch']} of {m['int_numel']} integer elements differ"
    if m["other_mismatch"]:
        return "non-tensor outputs differ"
    if m["float_exact"] is False and m["sqnr_db"] is None:
        return "the reference is zero, the emulation is not"
    if m["sqnr_db"] is not None and not m["float_exact"] and m["sqnr_db"] < min_sqnr:
        return f"SQNR {m['sqnr_db']:.2f} dB < {min_sqnr:g} dB"
    return None


# ---- the lockstep interpreter --------------------------------------------------------------------
def op_name(n) -> str:
    t = n.target
    if hasattr(t, "_schema") or type(t).__name__ == "OpOverload":
        s = str(t)
        return s.removesuffix(".default")
    return getattr(t, "__name__", str(t))


def is_npu_op(n) -> bool:
    return n.op == "call_function" and str(n.target).startswith("ptqc_npu.")


def lockstep(qm, windows, dev_a: str, *, progress=None, call_a=None) -> list[dict]:
    """Run the graph on ``dev_a`` (A) and on the CPU (B) node by node on each window; compare
    every call_function node's outputs (accumulated) and, for ptqc_npu ops, the emulation on
    A's inputs (local). Returns one record per call_function node, in graph order.

    ``call_a(node, args, kwargs)`` replaces A's ``node.target(*args, **kwargs)`` (tests use it
    as a stand-in for an NPU kernel that differs from the emulation)."""
    import torch
    import torch.fx as fx

    from ptqc.ir import info

    graph = qm.graph
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_function"]
    acc = {n.name: NodeStats() for n in calls}
    loc = {n.name: NodeStats() for n in calls if is_npu_op(n)}
    last_use = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    da, db = torch.device(dev_a), torch.device("cpu")
    weights_a: dict[str, torch.Tensor] = {}  # weights on A's device, moved once for all windows

    def call(n, env, dev, fn=None):
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if "device" in kwargs:
            kwargs = {**kwargs, "device": dev}
        return fn(n, args, kwargs) if fn is not None else n.target(*args, **kwargs)

    def to(v, dev):
        if isinstance(v, torch.Tensor):
            return v.to(dev)
        if isinstance(v, (tuple, list)):
            return type(v)(to(x, dev) for x in v)
        return v

    def to_cpu(v):
        return to(v, db)

    errors: dict[str, str] = {}  # node -> first error of a side (the run goes on with the other side's value)

    it = progress(windows) if progress else windows
    with torch.no_grad():
        for ids in it:
            ea: dict = {}
            eb: dict = {}
            for n in nodes:
                if n.op == "placeholder":
                    ea[n], eb[n] = ids.to(da), ids
                elif n.op == "get_attr":
                    t = qm.store[n.target]
                    if da.type != "cpu" and n.target not in weights_a:
                        weights_a[n.target] = t.to(da)
                    ea[n], eb[n] = weights_a.get(n.target, t), t
                elif n.op == "call_function":
                    va = vb = None
                    try:
                        va = call(n, ea, da, call_a)
                    except Exception as e:  # noqa: BLE001 - a kernel refusing its inputs is a finding
                        errors.setdefault(n.name, f"A ({dev_a}) raised {type(e).__name__}: {str(e)[:200]}")
                    try:
                        vb = call(n, eb, db)
                    except Exception as e:  # noqa: BLE001
                        errors.setdefault(n.name, f"B (cpu) raised {type(e).__name__}: {str(e)[:200]}")
                    if va is None and vb is None:
                        raise RuntimeError(f"node {n.name} ({op_name(n)}) fails on both sides: {errors[n.name]}")
                    va = to(vb, da) if va is None else va
                    vb = to_cpu(va) if vb is None else vb
                    acc[n.name].update(va, vb)
                    if n.name in loc:
                        try:
                            loc[n.name].update(va, call(n, {a: to_cpu(ea[a]) for a in n.all_input_nodes}, db))
                        except Exception as e:  # noqa: BLE001
                            errors.setdefault(n.name, f"emulation on A's inputs raised {type(e).__name__}: "
                                                      f"{str(e)[:200]}")
                    ea[n], eb[n] = va, vb
                elif n.op == "output":
                    break
                for a in n.all_input_nodes:
                    if last_use.get(a) is n:
                        ea.pop(a, None)
                        eb.pop(a, None)
    rows = []
    for i, n in enumerate(calls):
        m = info(n)
        rows.append({"index": i, "node": n.name, "op": op_name(n), "layer": m.get("layer"), "role": m.get("role"),
                     "module": m.get("module"), "npu_op": is_npu_op(n), **acc[n.name].metrics(),
                     "local": loc[n.name].metrics() if n.name in loc else None, "error": errors.get(n.name)})
    return rows


def summarize(rows: list[dict], min_sqnr: float = 40.0, max_mismatch: int = 0, strict: bool = False) -> dict:
    """Mark each row beyond tolerance (``accumulated_fail``, ``local_fail`` for ptqc_npu ops)
    and return the summary: first divergence, the ptqc_npu ops failing the check, failed."""
    first = None
    failures = []
    for r in rows:
        why = r.get("error") or _bad(r, min_sqnr, max_mismatch)
        r["accumulated_fail"] = why
        if why and first is None:
            first = r["node"]
        if r["npu_op"] or r.get("error"):
            lf = r.get("error") or _bad(r["local"], min_sqnr, max_mismatch)
            if strict and not lf and why:
                lf = f"accumulated: {why}"
            r["local_fail"] = lf
            if lf:
                failures.append({"node": r["node"], "op": r["op"], "layer": r["layer"], "why": lf})
    return {"nodes": len(rows), "npu_ops": sum(r["npu_op"] for r in rows), "first_divergence": first,
            "local_failures": failures, "failed": bool(failures)}


# ---- inputs, model preparation --------------------------------------------------------------------
def parse_lower_options(text: str | None) -> dict:
    from ptqc import diff
    from ptqc.lowering.ascend.backend import AscendTarget

    if not text:
        return {}
    pairs = [kv.partition("=") for kv in text.split(",") if kv]
    bad = [k for k, sep, _ in pairs if not sep]
    if bad:
        raise UserError(f"--lower takes key=value pairs separated by commas (got {bad[0]!r}), e.g. fuse=false")
    opts = diff.parse_options(AscendTarget, {k: v for k, _, v in pairs})
    if "device" in opts or "dtype" in opts:
        raise UserError("give the device and dtype with --device / --dtype, not in --lower")
    return opts


def resolve_device(name: str) -> str:
    """``cpu`` or a usable ``npu[:i]``; a UserError (one line) otherwise. torch_npu is imported
    only here, only for an npu device, only if installed (ptqc.device.resolve)."""
    from ptqc import device as devices
    from ptqc.errors import PtqcError

    kind = name.lower().split(":")[0]
    if kind not in ("cpu", "npu"):
        raise UserError(f"--device {name}: use npu[:N] (an Ascend NPU) or cpu (emulation only)")
    try:
        return devices.resolve(name)
    except PtqcError as e:
        if kind == "npu":
            raise UserError("no Ascend NPU here: torch_npu (with the CANN toolkit) is not installed or sees no "
                            "NPU; run on an Ascend machine, or pass --device cpu to check the emulation only") from e
        raise UserError(str(e)) from e


# ---- output ----------------------------------------------------------------------------------------
def _f(v, fmt, width=0):
    return ("-" if v is None else format(v, fmt)).rjust(width)


def _sq(m: dict) -> str:
    if m["shape_mismatch"]:
        return "shape"
    if not m["finite"]:
        return "nan"
    if m["sqnr_db"] is None:
        return "exact" if m["float_exact"] else "-"
    return f"{m['sqnr_db']:.2f}"


def format_table(rep: dict) -> str:
    lines = [f"{'#':>4} {'node':38s} {'op':34s} {'layer':>5s} {'max_abs':>10s} {'max_rel':>10s} {'SQNR dB':>8s} "
             f"{'int_mism':>8s} {'local SQNR':>10s} {'local_mism':>10s}"]
    for r in rep["rows"]:
        loc = r["local"]
        flag = ""
        if r["node"] == rep["summary"]["first_divergence"]:
            flag = "  <- first divergence"
        if r.get("local_fail"):
            flag += f"  FAIL: {r['local_fail']}"
        lines.append(f"{r['index']:>4} {r['node'][:38]:38s} {r['op'][:34]:34s} {_f(r['layer'], 'd', 5)} "
                     f"{_f(r['max_abs'], '.3e', 10)} {_f(r['max_rel'], '.3e', 10)} {_sq(r):>8s} "
                     f"{_f(r['int_mismatch'], 'd', 8)} {(_sq(loc) if loc else ''):>10s} "
                     f"{(_f(loc['int_mismatch'], 'd', 10) if loc else ''):>10s}{flag}".rstrip())
    return "\n".join(lines)


def format_summary(rep: dict) -> str:
    s = rep["summary"]
    lines = []
    if s["first_divergence"]:
        r = next(r for r in rep["rows"] if r["node"] == s["first_divergence"])
        lines.append(f"first divergence beyond tolerance (accumulated): {r['node']} ({r['op']}, layer {r['layer']}): "
                     f"{r['accumulated_fail']}")
    else:
        lines.append(f"no node diverges beyond tolerance (SQNR >= {rep['min_sqnr_db']:g} dB, "
                     f"<= {rep['max_mismatch']} integer mismatches)")
    if s["local_failures"]:
        first = s["local_failures"][0]
        lines.append(f"{len(s['local_failures'])} node(s) fail the check ({s['npu_ops']} ptqc_npu ops checked "
                     f"locally), first {first['node']} ({first['op']}): {first['why']}")
    else:
        lines.append(f"all {s['npu_ops']} ptqc_npu ops pass the local check (emulation on A's inputs == A)")
    lines.append(f"result: {'FAIL' if s['failed'] else 'OK'}")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ascend_check.py",
                                 description="Run an artifact's Ascend lowering on the NPU (torch_npu) and in CPU "
                                             "emulation and compare every node.")
    ap.add_argument("artifact", type=Path, help="a ptqc artifact directory (ptqc compile -o OUT)")
    ap.add_argument("--seqlen", type=int, default=128, help="tokens per window (default 128)")
    ap.add_argument("--windows", type=int, default=2, help="number of token windows (default 2)")
    ap.add_argument("--device", default="npu:0", help="npu[:N] (default npu:0) or cpu (emulation vs emulation, "
                                                      "plus fake-quant vs lowered)")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="run in this dtype (default: the artifact's)")
    ap.add_argument("--text", type=Path, default=None, help="windows from the start of this text file")
    ap.add_argument("--calib", type=Path, default=None, help="random windows of this calibration data "
                                                             "(default: the artifact's calib.txt / eval.txt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lower", default=None, help="lowering options, e.g. fuse=false,truncate=false")
    ap.add_argument("--min-sqnr", type=float, default=40.0, help="float tolerance in dB (default 40)")
    ap.add_argument("--max-mismatch", type=int, default=0,
                    help="integer output elements allowed to differ per node (default 0)")
    ap.add_argument("--strict", action="store_true",
                    help="also fail when a ptqc_npu op's accumulated values exceed the tolerance")
    ap.add_argument("--reference", action="store_true",
                    help="also compare the fake-quant graph with the lowered one (always on with --device cpu)")
    ap.add_argument("--json", default=None, help="write the report as JSON to this file (- for stdout)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


def run(args) -> tuple[dict, int]:
    import torch

    from ptqc import artifact, diff
    from ptqc.lowering.ascend.lower import lower

    if args.seqlen < 2 or args.windows < 1:
        raise UserError("--seqlen must be at least 2 and --windows at least 1")
    dev = resolve_device(args.device)  # before loading anything
    lower_opts = parse_lower_options(args.lower)
    if not args.artifact.is_dir():
        raise UserError(f"{args.artifact} is not a directory; give a ptqc artifact (ptqc compile -o OUT)")
    torch.manual_seed(args.seed)
    qm = artifact.load_any(args.artifact, args.dtype or "float32")
    ref = None if diff.is_lowered(qm) else qm.clone()  # the fake-quant graph, in the compiled dtype
    if args.dtype and getattr(torch, args.dtype) != qm.dtype:
        if ref is None:
            raise UserError(f"{args.artifact} is already lowered in {str(qm.dtype).removeprefix('torch.')}; "
                            f"drop --dtype or compile it without the ascend pass")
        diff.cast_parameters(qm, args.dtype)
    summary = None
    if ref is not None:
        summary = lower(qm, **{"fallback": True, **lower_opts})
    elif lower_opts:
        raise UserError(f"{args.artifact} is already lowered (compiled with the ascend pass); drop --lower")
    spec = str(args.artifact)
    ref_target = diff.TorchTarget(args.artifact, ref if ref is not None else qm, spec)
    ids, source = diff.input_windows(ref_target, text=args.text, samples=args.windows, seqlen=args.seqlen,
                                     seed=args.seed, calib=args.calib)
    from tqdm.auto import tqdm

    def progress(it):
        return tqdm(it, desc="windows", leave=False, disable=args.quiet)
    rows = lockstep(qm, [w[None] for w in ids], dev, progress=progress)
    summ = summarize(rows, args.min_sqnr, args.max_mismatch, args.strict)
    rep = {
        "format": FORMAT, "version": VERSION, "artifact": str(args.artifact),
        "a": {"device": dev, "runs": "torch_npu kernels" if dev != "cpu" else "CPU emulation"},
        "b": {"device": "cpu", "runs": "CPU emulation"},
        "dtype": str(qm.dtype).removeprefix("torch."), "windows": int(ids.shape[0]), "seqlen": int(ids.shape[-1]),
        "input": source, "min_sqnr_db": args.min_sqnr, "max_mismatch": args.max_mismatch, "strict": args.strict,
        "lowering": {"options": lower_opts, "lowered_here": ref is not None,
                     "refused": summary["refused"] if summary else []},
        "rows": rows,
        "summary": summ,
        "reference": None,
    }
    if ref is not None and (dev == "cpu" or args.reference):
        from ptqc.lowering.ascend.backend import AscendTarget

        low = AscendTarget(args.artifact, qm, f"{spec}:ascend", {"device": dev})
        rep["reference"] = diff.diff(ref_target, low, ids, threshold=args.min_sqnr)
    return rep, 1 if summ["failed"] else 0


def main(argv=None) -> int:
    from ptqc.errors import PtqcError

    args = build_parser().parse_args(argv)
    try:
        rep, code = run(args)
    except (UserError, PtqcError) as e:
        print(f"ascend_check: error: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(rep, indent=1, allow_nan=False))
        return code
    a = rep["a"]
    print(f"{rep['artifact']}: A = {a['device']} ({a['runs']})  B = cpu (CPU emulation)  {rep['dtype']}  "
          f"{rep['windows']} windows x {rep['seqlen']} tokens of {rep['input']}")
    if rep["lowering"]["refused"]:
        ref = rep["lowering"]["refused"]
        print(f"not lowered (kept as fake-quant ops): {len(ref)}, first: {ref[0]}")
    print(format_table(rep))
    print(format_summary(rep))
    if rep["reference"] is not None:
        from ptqc import diff

        print("\nfake-quant reference (A) vs lowered graph (B), ptqc diff probes:")
        print(diff.format_table(rep["reference"]))
    if args.json:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rep, indent=1, allow_nan=False))
    return code


if __name__ == "__main__":
    sys.exit(main())
