"""Frontend: Hugging Face model directory -> canonical ptqc graph.

1. build the transformers model on the meta device (buffers real) and ``torch.export`` it
   (non-strict, ``use_cache=False``, dynamic batch and sequence);
2. turn weight placeholders into ``get_attr`` nodes named by their Hugging Face names;
3. canonicalize with a table of small rewrite rules (:data:`RULES`): aten.linear -> ptqc.linear,
   pow/mean/rsqrt/mul -> ptqc.rms_norm, repeat_kv + SDPA -> ptqc.attention, no-op casts dropped;
4. annotate every node with its module path, decoder layer and role (:data:`ROLE_TABLE`).

MoE blocks are swapped for traceable ones before export (:mod:`ptqc.moe`): their router becomes a
``ptqc.linear`` (role ``router``) and ``ptqc.moe_route``, their experts one ``ptqc.moe_experts``
(role ``experts``) on [E, out, in] stacks; weights keep the checkpoint's names.

No code here names an architecture: anything with the common decoder-only layout works.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import torch
import torch.fx as fx

from ptqc import families, mla, moe, norms, ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op, propagate
from ptqc.model import WeightStore, build_meta_model, load_config, parse_dtype, weight_files
from ptqc.patterns import Pat

aten = torch.ops.aten

# Module leaf name -> role. The only architecture knowledge in ptqc; extend it for new layouts.
ROLE_TABLE = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "wq": "q", "wk": "k", "wv": "v", "wo": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "w1": "gate", "w3": "up", "w2": "down",
    "lm_head": "lm_head", "embed_tokens": "embed", "tok_embeddings": "embed",
    "input_layernorm": "input_norm", "attention_norm": "input_norm",
    "post_attention_layernorm": "post_attention_norm", "ffn_norm": "post_attention_norm",
    "self_attn": "attention", "attention": "attention", "shared_expert_gate": "shared_expert_gate",
    # LayerNorm families: GPT-NeoX (embed_in/embed_out, query_key_value, dense, dense_h_to_4h ...),
    # Phi-2 (dense, fc1/fc2), Falcon (word_embeddings, ln_attn/ln_mlp)
    "embed_out": "lm_head", "embed_in": "embed", "word_embeddings": "embed",
    "query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "fc1": "up", "fc2": "down", "ln_attn": "input_norm", "ln_mlp": "post_attention_norm",
    "pre_feedforward_layernorm": "pre_feedforward_norm", "post_feedforward_layernorm": "post_feedforward_norm",
    "qkv_proj": "qkv", "gate_up_proj": "gate_up"}  # the last two: Phi-3's fused projections
ROLE_TABLE.update(mla.ROLES)  # DeepSeek MLA: q_a_proj -> "q_a", kv_b_proj -> "kv_b", ...
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")
_LAYER_RE = re.compile(r"\.(\d+)(?:\.|$)")


# ---- export ----------------------------------------------------------------------------------
def export(model, seq_max: int):
    ids = torch.zeros((2, 16), dtype=torch.long, device="meta")
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=max(seq_max, 17))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside torch.export
            ep = torch.export.export(model, (ids,), kwargs={"use_cache": False},
                                     dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None},
                                     strict=False)
            ep = ep.run_decompositions({})  # inline higher-order ops, keep linear/sdpa
    except Exception as e:  # noqa: BLE001
        raise PtqcError(f"torch.export could not trace {type(model).__name__}: {str(e).splitlines()[0]}") from None
    return ep


def to_ptqc_graph(ep) -> fx.Graph:
    """Copy the exported graph, turning parameter/buffer/constant inputs into get_attr nodes."""
    sig = ep.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
               **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name in weights:
                env[n] = g.get_attr(weights[n.name])
            elif n.name == user_inputs[0]:
                env[n] = g.placeholder("input_ids")
            else:
                continue  # use_cache and other non-tensor flags
            env[n].meta.update(n.meta)
        elif n.op == "output":
            g.output(env[n.args[0][0]])  # logits
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.eliminate_dead_code()
    return g


# ---- canonicalization rules ------------------------------------------------------------------
def _replace(node: fx.Node, target, args, kwargs=None) -> fx.Node:
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, args, kwargs or {})
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
    return new


def _dtype(n) -> torch.dtype | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return getattr(v, "dtype", None)


def rule_drop_noops(node: fx.Node) -> bool:
    """Drop metadata asserts, aliases and casts to the dtype the value already has."""
    if node.target in (aten._assert_tensor_metadata.default,):
        node.graph.erase_node(node)
        return True
    if node.target in (aten.alias.default, aten.lift_fresh_copy.default):
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        return True
    if node.target == aten.type_as.default and _dtype(node.args[0]) is not None \
            and _dtype(node.args[0]) == _dtype(node):  # Gemma's norm: type_as(x) of a value already x's dtype
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        return True
    if node.target == aten._to_copy.default and set(node.kwargs) <= {"dtype", "layout", "device"}:
        src = node.args[0]
        if _dtype(src) is not None and _dtype(src) == _dtype(node) and "device" not in node.kwargs:
            node.replace_all_uses_with(src)
            node.graph.erase_node(node)
            return True
    return False


def rule_linear(node: fx.Node) -> bool:
    if node.target != aten.linear.default:
        return False
    x, w, *b = node.args
    _replace(node, ops.LINEAR, (x, w, b[0] if b else None))
    return True


_CASTS = (aten._to_copy.default, aten.to.dtype)
_WEIGHT = Pat(name="w", where=lambda w: isinstance(w, fx.Node) and w.op == "get_attr", through=_CASTS)
_X = Pat(name="x", through=_CASTS)  # x * rsqrt(mean(x ** 2, -1, keepdim) + eps), casts looked through
_NORMALIZED = Pat(aten.mul.Tensor, (_X, Pat(aten.rsqrt.default, (Pat(aten.add.Tensor, (
    Pat(aten.mean.dim, (Pat(aten.pow.Tensor_Scalar, (_X, 2)), Pat(where=lambda d: list(d) == [-1]), True)),
    Pat(name="eps", where=lambda e: isinstance(e, float)))),))), commute=True, through=_CASTS)
_GEMMA = Pat(aten.mul.Tensor, (_NORMALIZED, Pat(aten.add.Tensor, (
    _WEIGHT, Pat(name="offset", where=lambda o: isinstance(o, (int, float)))), through=_CASTS)), commute=True)
RMS_NORM_FORMS = (  # Llama's w * normalized; Gemma's normalized * (1 + w), cast or not
    Pat(aten.mul.Tensor, (Pat(name="w", where=_WEIGHT.where), _NORMALIZED), commute=True),
    Pat(aten._to_copy.default, (_GEMMA,)), _GEMMA)


def rule_rms_norm(node: fx.Node) -> bool:
    """w * cast(x * rsqrt(mean(x^2, -1) + eps))  ->  ptqc.rms_norm(x, w, eps)
    and Gemma's cast(x * rsqrt(...) * (1 + w)) -> ptqc.rms_norm(x, w, eps, offset=1)."""
    m = next((m for m in (p.match(node) for p in RMS_NORM_FORMS) if m is not None), None)
    if m is None:
        return False
    _replace(node, ops.RMS_NORM, (m["x"], m["w"], m["eps"]) + ((float(m["offset"]),) if "offset" in m else ()))
    return True


_REPEAT_OPS = (aten.expand.default, aten.unsqueeze.default, aten.reshape.default, aten.view.default,
               aten.clone.default, aten._unsafe_view.default)


def _strip_repeat_kv(k: fx.Node) -> fx.Node:
    """k = reshape(expand(k0[:, :, None], [B, Hkv, n_rep, S, D]), [B, H, S, D]) -> k0."""
    cur, seen_expand = k, False
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in _REPEAT_OPS:
        seen_expand |= cur.target == aten.expand.default
        cur = cur.args[0]
    v0, v = (cur.meta.get("val") if isinstance(cur, fx.Node) else None), k.meta.get("val")
    if seen_expand and v0 is not None and v is not None and v0.dim() == 4 and v.dim() == 4:
        return cur
    return k


def rule_attention(node: fx.Node) -> bool:
    """SDPA (with the model's causal mask, GQA repeat_kv) -> ptqc.attention(q, k, v, scale)."""
    if node.target != aten.scaled_dot_product_attention.default:
        return False
    q, k, v, *rest = node.args
    kw = dict(node.kwargs)
    names = ("attn_mask", "dropout_p", "is_causal")
    kw.update({n: a for n, a in zip(names, rest)})
    if kw.get("dropout_p", 0.0):
        raise PtqcError("attention dropout is on in the traced model; ptqc traces models in eval mode only")
    head_dim = q.meta["val"].shape[-1]
    scale = kw.get("scale") or 1.0 / float(head_dim) ** 0.5
    new = _replace(node, ops.ATTENTION, (q, _strip_repeat_kv(k), _strip_repeat_kv(v), float(scale)),
                   {"causal": True, "window": -1})
    new.meta["sdpa"] = {"had_mask": kw.get("attn_mask") is not None or bool(kw.get("is_causal"))}
    return True


def rule_moe_args(node: fx.Node) -> bool:
    """ptqc.moe_route / moe_experts: tensors positional, every other argument a keyword (defaults
    written out), so the routing rule is data in the node."""
    if node.target not in (ops.MOE_ROUTE, ops.MOE_EXPERTS) or node.meta.get("moe_args"):
        return False
    n_tensors = 2 if node.target == ops.MOE_ROUTE else 6
    schema = node.target._schema.arguments
    given = {a.name: v for a, v in zip(schema, node.args)} | dict(node.kwargs)
    values = {a.name: given[a.name] if a.name in given else a.default_value for a in schema}
    names = [a.name for a in schema]
    node.args = tuple(values[k] for k in names[:n_tensors])
    node.kwargs = {k: values[k] for k in names[n_tensors:]}
    node.meta["moe_args"] = True
    return True


# The canonicalization table: each rule looks at one node and rewrites it in place.
RULES = (rule_drop_noops, rule_linear, families.rule_matmul_linear, rule_rms_norm, norms.rule_layer_norm,
         rule_attention, families.canonical_attention_args, rule_moe_args,
         mla.rule_mla_key)


def canonicalize(g: fx.Graph) -> None:
    for rule in RULES:
        for node in list(g.nodes):
            if node.op == "call_function" and not getattr(node, "_erased", False):
                rule(node)
        g.eliminate_dead_code()
    g.lint()


# ---- annotation ------------------------------------------------------------------------------
def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__.")


def _role_of(path: str) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ROLE_TABLE:
        return ROLE_TABLE[leaf]
    if leaf in FINAL_NORM_NAMES and not _LAYER_RE.search(path):
        return "final_norm"
    return None


def resolve_tied(g: fx.Graph, store, tied: dict[str, set[str]], files, path) -> None:
    """Point every weight the checkpoint lacks at a tied parameter it has (lm_head -> embed_tokens)."""
    for n in g.nodes:
        if n.op == "get_attr" and n.target not in store:
            src = [t for t in sorted(tied.get(n.target, ())) if t in files]
            if not src:
                raise PtqcError(f"weight {n.target!r} is missing from the checkpoint in {path}")
            store.aliases[n.target] = src[0]


def untie(g: fx.Graph, tied: dict[str, set[str]]) -> None:
    """Give each user of a tied weight (embedding and lm_head) a get_attr with its own name,
    so quantizing lm_head never touches the embedding; the store aliases the names."""
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        idx = 0 if n.target == aten.embedding.default else 1
        if n.target not in (aten.embedding.default, ops.LINEAR, *norms.NORMS):
            continue
        w = n.args[idx]
        own = f"{_module_path(n)}.weight"
        if isinstance(w, fx.Node) and w.op == "get_attr" and w.target != own and own in tied.get(w.target, ()):
            with g.inserting_before(n):
                mine = g.get_attr(own)
            args = list(n.args)
            args[idx] = mine
            n.args = tuple(args)
    g.eliminate_dead_code()


def annotate(g: fx.Graph, config) -> None:
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    for n in g.nodes:
        if n.op != "call_function":
            continue
        path = _module_path(n)
        # Weighted ops are named by their weight (robust even without module stacks).
        if n.target in (ops.LINEAR, *norms.NORMS) or n.target == aten.embedding.default:
            w = n.args[1] if n.target != aten.embedding.default else n.args[0]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                path = w.target.rsplit(".", 1)[0]
        m = _LAYER_RE.search(path)
        meta = info(n)
        meta["module"] = path
        meta["layer"] = int(m.group(1)) if m else None
        role = _role_of(path) if n.target in (ops.LINEAR, *norms.NORMS, aten.embedding.default) else None
        if n.target == ops.ATTENTION:
            role = "attention"
            i = meta["layer"]
            if layer_types is not None and i is not None and i < len(layer_types):
                sliding = layer_types[i] == "sliding_attention"
            else:
                sliding = bool(window) and getattr(config, "use_sliding_window", True)
            if sliding and window:
                n.kwargs = {**n.kwargs, "window": int(window)}
        elif n.target == ops.LINEAR and role is None and path.endswith("lm_head"):
            role = "lm_head"
        meta["role"] = role
    annotate_moe(g)
    for n in g.nodes:
        n.meta.pop("val", None)
        n.meta.pop("tensor_meta", None)
        n.meta.pop("nn_module_stack", None)
        n.meta.pop("stack_trace", None)
        n.meta.pop("source_fn_stack", None)
        n.meta.pop("original_aten", None)
        n.meta.pop("from_node", None)
        n.meta.pop("seq_nr", None)
        n.meta.pop("torch_fn", None)
        n.meta.pop("sdpa", None)
        n.meta.pop("moe_args", None)


def mark_float32(g: fx.Graph, dt: torch.dtype, keys) -> None:
    """Checkpoint tensors the model holds in float32 while it runs in ``dt`` (e.g. DeepSeek-V3-style
    routers and their e_score_correction_bias) are marked ``{"dtype": "float32"}``: the store reads
    them uncast."""
    for n in g.nodes:
        if n.op == "get_attr" and dt != torch.float32 and _dtype(n) == torch.float32 and n.target in keys:
            info(n)["dtype"] = "float32"


def annotate_moe(g: fx.Graph) -> None:
    """Experts are named by their stacks (``...mlp.experts``, role ``experts``); the linear giving
    the routing logits is the ``router``, and the routing op takes its module (role ``route``)."""
    for n in g.nodes:
        if is_op(n, ops.MOE_EXPERTS) and isinstance(n.args[3], fx.Node) and n.args[3].op == "get_attr":
            info(n).update({"module": n.args[3].target.rsplit(".", 2)[0], "role": "experts"})
        elif is_op(n, ops.MOE_ROUTE):
            lin = n.args[0]
            while isinstance(lin, fx.Node) and lin.target in _CASTS:
                lin = lin.args[0]
            if is_op(lin, ops.LINEAR):
                info(lin)["role"] = "router"
                info(n).update({"module": info(lin)["module"], "layer": info(lin)["layer"]})
            info(n)["role"] = "route"


def check_canonical(g: fx.Graph) -> None:
    """Every linear and attention must have been canonicalized; say what was not."""
    left = [n for n in g.nodes if n.op == "call_function"
            and n.target in (aten.linear.default, aten.scaled_dot_product_attention.default,
                             aten.matmul.default, aten.bmm.default, aten.mm.default)]
    if left:
        where = _module_path(left[0]) or "the model"
        raise PtqcError(f"unsupported construct in {where}: {left[0].target} could not be canonicalized "
                        f"({len(left)} such ops left); ptqc does not know this attention or projection layout yet")
    if not any(is_op(n, ops.LINEAR) for n in g.nodes):
        raise PtqcError("no linear layers found in the traced model")


# ---- entry point -----------------------------------------------------------------------------
def trace(path: Path, config, dt: torch.dtype, trust_remote_code: bool, bar=None):
    """Export + canonicalize + annotate: (graph, real buffers, tied parameter groups)."""
    def step(msg):
        if bar is not None:
            bar.update()
            bar.set_postfix_str(msg)

    model = build_meta_model(config, dt, trust_remote_code)
    mla.prepare(model)
    moe.swap_moe(model, getattr(config, "hidden_act", "silu"))
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    by_param: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), set()).add(name)
    tied = {name: group for group in by_param.values() if len(group) > 1 for name in group}
    model.to("meta")
    seq_max = getattr(config, "max_position_embeddings", 4096) or 4096
    step("torch.export")
    ep = export(model, seq_max)
    families.check_constants(ep)
    del model
    step("canonicalize")
    g = to_ptqc_graph(ep)
    canonicalize(g)
    check_canonical(g)
    untie(g, tied)
    keys = weight_files(Path(path)).keys()
    moe.rename_to_checkpoint(g, keys, getattr(config, "model_type", None))
    families.rename_to_checkpoint(g, keys, config)
    mark_float32(g, dt, keys)
    annotate(g, config)
    for n in g.nodes:  # arange(..., device=meta) from the meta trace: run on CPU by default
        if n.op == "call_function" and "device" in n.kwargs:
            n.kwargs = {**n.kwargs, "device": torch.device("cpu")}
    return g, buffers, tied


def _trace_in_child(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """Run :func:`trace` in a child process and read its result back. torch.export leaves a few
    hundred MB of caches and generated code behind in the process that ran it; a compile that
    streams a large model should not carry that."""
    import json
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    from ptqc.ir import graph_from_json

    with tempfile.TemporaryDirectory(prefix="ptqc-trace-") as tmp:
        cmd = [sys.executable, "-m", "ptqc.frontend", str(path), str(dtype).removeprefix("torch."), tmp]
        if trust_remote_code:
            cmd.append("--trust-remote-code")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            msg = lines[-1].removeprefix("error: ") if lines else f"exit status {r.returncode}"
            raise PtqcError(msg if r.returncode == 2 else f"tracing {path} failed in the child process: {msg}")
        t = Path(tmp)
        g = graph_from_json(json.loads((t / "graph.json").read_text()))
        buffers = load_file(str(t / "buffers.safetensors")) if (t / "buffers.safetensors").exists() else {}
        tied = {k: set(v) for k, v in json.loads((t / "tied.json").read_text()).items()}
    return g, buffers, tied


def _child_main(argv) -> None:
    import json

    from safetensors.torch import save_file

    from ptqc.ir import graph_to_json

    path, dtype, out = Path(argv[0]), parse_dtype(argv[1]), Path(argv[2])
    trc = "--trust-remote-code" in argv
    try:
        g, buffers, tied = trace(path, load_config(path, trc), dtype, trc)
    except PtqcError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    (out / "graph.json").write_text(json.dumps(graph_to_json(g)))
    if buffers:
        save_file({k: v.contiguous() for k, v in buffers.items()}, str(out / "buffers.safetensors"))
    (out / "tied.json").write_text(json.dumps({k: sorted(v) for k, v in tied.items()}))


ISOLATE_BYTES = 1 << 30  # trace in a child process for checkpoints larger than this (isolate="auto")


def load(model_dir, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
         progress: bool = False, isolate: bool | str = False, shapes: bool = True,
         supply: dict[str, torch.Tensor] | None = None) -> QModel:
    """Trace a Hugging Face causal LM directory into a canonical :class:`QModel`.

    Weights are not read: they stay in the safetensors files until a pass or a run needs them.
    ``isolate=True`` traces in a child process (``"auto"``: for checkpoints over 1 GiB), so
    the tracer's memory is returned to the system before any weight is read. ``shapes=False``
    skips shape propagation (for loaders that rewrite quantized checkpoints first); ``supply``
    gives stand-ins for tensors the directory lacks (an export reader replaces them)."""
    from ptqc.progress import bar as progress_bar

    path = Path(model_dir)
    config = load_config(path, trust_remote_code)
    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    files = weight_files(path)
    if isolate == "auto":
        isolate = sum(f.stat().st_size for f in set(files.values())) > ISOLATE_BYTES
    bar = progress_bar(total=4, desc="trace", quiet=not progress,
                       bar_format="{desc}: {n}/{total} {postfix} [{elapsed}]")
    bar.set_postfix_str("build on meta")
    if isolate:
        bar.set_postfix_str("export in a child process")
        g, buffers, tied = _trace_in_child(path, dt, trust_remote_code)
        bar.update(2)
    else:
        g, buffers, tied = trace(path, config, dt, trust_remote_code, bar)
    store = WeightStore(files, dt)
    for name, b in {**(supply or {}), **buffers}.items():
        if name not in files:
            store.overlay[name] = b
    moe.register_stacks(g, store)
    store.keep_dtype = {n.target for n in g.nodes if n.op == "get_attr"
                        and n.meta.get("ptqc", {}).get("dtype") == "float32"}
    resolve_tied(g, store, tied, files, path)
    qm = QModel(graph=g, store=store, config=config, dtype=dt, source=str(path.resolve()),
                properties={"canonical"})
    bar.update()
    bar.set_postfix_str("shapes")
    if shapes:
        propagate(g, store)
    bar.update()
    bar.close()
    return qm


if __name__ == "__main__":  # the child of load(isolate=True)
    _child_main(sys.argv[1:])
