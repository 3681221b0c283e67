"""Views of a ptqc graph for people: a node table, JSON, Graphviz DOT, per-op counts."""
from __future__ import annotations

import json
from collections import Counter

import torch.fx as fx

from ptqc.ir import QModel
from ptqc.ops import MOE_EXPERTS
from ptqc.passmanager import _short


def _quant_str(q: dict) -> str:
    """A node's quantization parameters (``meta["ptqc"]["quant"]``) on one line."""
    parts = []
    for k, v in q.items():  # MoE experts: gate_proj / up_proj / down_proj weights, input, down_input
        g = _granularity(v, "ch" if k == "weight" or k.endswith("_proj") else "tok")
        label = k if k.endswith("_proj") or k == "down_input" else k[0]
        parts.append(f"{label}:int{v.get('base_bits', v.get('bits'))} {g} {'sym' if v.get('sym') else 'asym'} ({v.get('method', '')})"
                     + _experts_str(v, parts))
    return "; ".join(parts)


def _granularity(v: dict, per_row: str = "ch") -> str:
    """``ch``/``tok`` (group 0: per channel or per token), ``tensor`` (-1) or ``gN``."""
    return v.get("granularity") or {0: per_row, -1: "tensor"}.get(v.get("group"), f"g{v.get('group')}")


def _experts_str(v: dict, parts: list) -> str:
    """An expert stack's per-expert facts: routed tokens (once per node), fallback experts, other bits."""
    out = ""
    if "tokens" in v and not any("tokens " in p for p in parts):
        out += " tokens " + "/".join(map(str, v["tokens"]))
    if v.get("fallback"):
        out += f" fallback {v['fallback']}:{v.get('few_tokens', '')}"
    if v.get("expert_bits"):
        out += " experts " + ",".join(f"{e}:int{b}" for e, b in v["expert_bits"].items())
    return out


def rows(qm: QModel, layer=None, op=None, role=None) -> list[dict]:
    """The call nodes (and placeholders, output) with these layer, op and role, as dicts."""
    out = []
    for n in qm.graph.nodes:
        if n.op == "get_attr":
            continue
        m = n.meta.get("ptqc", {})
        opname = _short(n.target) if n.op == "call_function" else n.op
        if layer is not None and m.get("layer") != layer:
            continue
        if op is not None and op not in opname:
            continue
        if role is not None and m.get("role") != role:
            continue
        out.append({
            "name": n.name, "op": opname, "module": m.get("module", ""), "layer": m.get("layer"),
            "role": m.get("role"), "shape": n.meta.get("shape"), "dtype": n.meta.get("dtype"),
            "quant": m.get("quant", {}), "inputs": [a.name for a in n.all_input_nodes],
        })
    return out


def op_counts(qm: QModel, per_layer: bool = False):
    if not per_layer:
        return dict(Counter(_short(n.target) for n in qm.graph.nodes if n.op == "call_function").most_common())
    by: dict = {}
    for n in qm.graph.nodes:
        if n.op == "call_function":
            layer = n.meta.get("ptqc", {}).get("layer")
            by.setdefault(layer, Counter())[_short(n.target)] += 1
    return by


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]" if s is not None else ""


def text_table(rs: list[dict]) -> str:
    cols = ["name", "op", "module", "layer", "role", "shape", "dtype", "quant"]
    table = [[r["name"], r["op"], r["module"], "" if r["layer"] is None else str(r["layer"]), r["role"] or "",
              _shape(r["shape"]), r["dtype"] or "", _quant_str(r["quant"])]
             for r in rs]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def quant_table(qm: QModel) -> str:
    if not qm.quant:
        return "no quantized modules"
    lines = []
    for mod, q in qm.quant.items():
        for kind, p in q.items():
            extra = {k: v for k, v in p.items() if k not in ("method", "bits", "group", "sym")}
            g = {0: "per-channel", -1: "per-tensor"}.get(p.get("group"), f"group {p.get('group')}")
            lines.append(f"{mod:45s} {kind:7s} {p.get('method', ''):8s} int{p.get('bits')} {g:12s} "
                         f"{'sym' if p.get('sym') else 'asym'}  {json.dumps(extra)}")
    return "\n".join(lines)


def _expert_scheme(rec: dict | None, e: int) -> str:
    """Expert ``e``'s weight scheme in a stack's quant record (``weight`` entry), e.g. ``gptq int4 g128 asym``;
    an expert that fell back for having too few routed tokens says so."""
    if not rec:
        return "float"
    method = rec.get("method", "")
    if e in rec.get("fallback", []):
        method = "rtn (few tokens)" if rec.get("few_tokens", "rtn") == "rtn" else f"{method} (all-token stats)"
    bits = rec.get("expert_bits", {}).get(str(e), rec.get("base_bits", rec.get("bits")))  # sensitive:unit=expert
    return f"{method} int{bits} {_granularity(rec)} {'sym' if rec.get('sym') else 'asym'}"


def experts(qm: QModel) -> list[dict]:
    """Per MoE experts node: its module, and per expert the routed calibration tokens (None when the
    passes recorded none) and the weight scheme of each projection."""
    out = []
    for n in qm.nodes(MOE_EXPERTS):
        mod = n.meta.get("ptqc", {}).get("module", n.name)
        projs = ("gate_proj", "up_proj", "down_proj")
        recs = {p: qm.quant.get(f"{mod}.{p}", {}).get("weight") for p in projs}
        shape = n.args[3].meta.get("shape") if isinstance(n.args[3], fx.Node) else None
        count = shape[0] if shape else max((len(r.get("tokens", [])) for r in recs.values() if r), default=0)
        tokens = next((r["tokens"] for r in recs.values() if r and "tokens" in r), None)
        out.append({"module": mod, "experts": [
            {"expert": e, "tokens": tokens[e] if tokens else None,
             **{p: _expert_scheme(recs[p], e) for p in projs}} for e in range(count)]})
    return out


def experts_table(qm: QModel) -> str:
    """:func:`experts` as text: one line per expert (empty for a model without MoE blocks)."""
    lines = []
    for blk in experts(qm):
        lines.append(f"{blk['module']}: {len(blk['experts'])} experts")
        rows = [[str(x["expert"]), "-" if x["tokens"] is None else str(x["tokens"]), x["gate_proj"], x["up_proj"],
                 x["down_proj"]] for x in blk["experts"]]
        cols = ["expert", "tokens", "gate_proj", "up_proj", "down_proj"]
        w = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
        lines += ["  " + "  ".join(v.ljust(k) for v, k in zip(r, w)).rstrip() for r in [cols, *rows]]
    return "\n".join(lines)


def dot(rs: list[dict]) -> str:
    keep = {r["name"] for r in rs}
    lines = ["digraph ptqc {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for r in rs:
        label = f"{r['name']}\\n{r['op']}" + (f"\\n{r['module']}" if r["module"] else "")
        color = ', style=filled, fillcolor="#ffe0b0"' if r["quant"] else ""
        lines.append(f'  "{r["name"]}" [label="{label}"{color}];')
        for i in r["inputs"]:
            if i in keep:
                lines.append(f'  "{i}" -> "{r["name"]}";')
    lines.append("}")
    return "\n".join(lines)


def render(qm: QModel, fmt: str = "text", layer=None, op=None, role=None) -> str:
    rs = rows(qm, layer, op, role)
    if fmt == "json":
        return json.dumps({"nodes": rs, "op_counts": op_counts(qm), "quant": qm.quant,
                           "properties": sorted(qm.properties), "experts": experts(qm)}, indent=1)
    if fmt == "dot":
        return dot(rs)
    counts = op_counts(qm)
    ex = experts_table(qm)
    return "\n".join([
        text_table(rs), "",
        "op counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()),
        f"properties: {', '.join(sorted(qm.properties))}", "",
        "quantized modules:", quant_table(qm),
        *(["", "MoE experts (routed calibration tokens, weight scheme per projection):", ex] if ex else [])])


def counts_text(qm: QModel, per_layer: bool = False, fmt: str = "text") -> str:
    """:func:`op_counts` as JSON, or one line per op (per decoder layer with ``per_layer``)."""
    c = op_counts(qm, per_layer)
    if fmt == "json":
        return json.dumps({str(k): dict(v) if per_layer else v for k, v in c.items()}, indent=1)
    if per_layer:
        return "\n".join(f"layer {k}: " + ", ".join(f"{o}={n}" for o, n in sorted(v.items())) for k, v in c.items())
    return "\n".join(f"{k:24s} {v}" for k, v in c.items())


KERNEL_COLUMNS = ("layer", "naive", "shared", "fused", "fused_kernels", "quant_matmul", "cache_quant", "attention",
                  "float_transform", "moe_gating", "moe_init_routing", "grouped_matmul", "moe_dynamic_quant",
                  "moe_finalize")


def kernel_table(rows: list[dict]) -> str:
    """The rows of a backend's kernel report (``ptqc inspect --ops``) as a table."""
    cols = [c for c in KERNEL_COLUMNS if rows and c in rows[0]]
    return "\n".join(["standalone quantization kernels per decoder layer (naive: one per linear; shared: one per "
                      "quantized input; fused: after add+RMSNorm+quant and SwiGLU+quant fusion), then what the fused "
                      "lowering runs: fused norm/activation+quant kernels, quantized matmuls, KV cache writes, "
                      "attention kernels, float rotation matmuls; MoE layers: gating, init_routing, grouped matmuls, "
                      "expert-input dynamic quantization, finalize_routing",
                      "  ".join(f"{c:>15s}" for c in cols),
                      *("  ".join(f"{r[c]:>15}" for c in cols) for r in rows)])
