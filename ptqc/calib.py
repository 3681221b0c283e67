"""Layer-by-layer execution: calibration, evaluation and diagnostics on bounded memory.

The graph is cut into **segments** (:func:`split`): ``prefix`` (embedding, rotary tables), one
per decoder layer, and ``suffix`` (final norm, lm_head). A node goes with its
``meta["ptqc"]["layer"]``; nodes computed from weights only go with their first user; other
unannotated nodes go to the prefix before the first layer, the suffix after the last, else to
the preceding layer. A :class:`LayerRunner` pushes every batch through one segment at a time,
keeping per batch only the values later segments read, and reads a segment's weights when it
runs and releases them after: one decoder layer of weights is ever loaded.

:func:`calibrate` is the loop every calibrated pass uses::

    def observe(layer):           # which statistics this pass needs in this layer
        return {lin: {"h": Hessian()} for lin in qm.linears(layer=layer)}

    def apply(layer, stats):      # quantize the layer from them (may rewrite the graph)
        for lin, obs in stats.items(): ...

    calibrate(qm, ctx, observe, apply, propagate="quantized")

Per layer: observe, ``apply``, then the next layer's inputs come from the quantized layer
(``"quantized"``, GPTQ's convention) or from the observation run (``"float"``).
``"sequential"`` calls ``apply`` once per observed input (q/k/v, o, gate/up, down) as soon as
its statistics are complete, later linears observed with the earlier ones quantized
(:meth:`LayerRunner.run_staged`). An observer with ``where="call"`` sees all input values of
its node (an MoE experts node: x, routing and stacks). Non-finite activations stop with the layer and module named.
Under several ranks (:mod:`ptqc.distributed`) each rank feeds its share of the batches and the
observers are reduced before ``apply``; with ``ctx.checkpoints`` (:mod:`ptqc.resume`) every layer
is checkpointed and a resumed run replays the checkpointed layers.
"""
from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.fx as fx

from ptqc import distributed, resume
from ptqc.activations import Batches
from ptqc.errors import PtqcError
from ptqc.interpreter import Interpreter
from ptqc.ir import QModel


@dataclass
class Segment:
    key: str  # "prefix", "layer.3", "suffix"
    layer: int | None
    nodes: list[fx.Node]  # call_function nodes (and the output node for the suffix) in order
    weights: list[str] = field(default_factory=list)  # tensor names it reads
    consts: set[str] = field(default_factory=set)  # nodes computed from weights only (once per run)
    keep: set[str] = field(default_factory=set)  # values (own or earlier) needed after it


def _is_const(n: fx.Node, const: set[str]) -> bool:
    return n.op == "call_function" and all(a.op == "get_attr" or a.name in const for a in n.all_input_nodes)


def split(graph: fx.Graph) -> list[Segment]:
    """Cut the graph into prefix / layer 0..L-1 / suffix segments (see module doc)."""
    nodes = list(graph.nodes)
    layer_of = {n.name: n.meta.get("ptqc", {}).get("layer") for n in nodes}
    pos = [i for i, n in enumerate(nodes) if layer_of[n.name] is not None and n.op == "call_function"]
    if not pos:
        raise PtqcError("the graph has no decoder layers (no node carries a layer index)")
    first, last = pos[0], pos[-1]
    const: set[str] = set()
    for n in nodes:
        if _is_const(n, const):
            const.add(n.name)
    seg_of: dict[str, str] = {}
    current = "prefix"
    for i, n in enumerate(nodes):
        if n.op != "call_function" or n.name in const:
            continue
        lay = layer_of[n.name]
        if lay is not None:
            current = f"layer.{lay}"
        elif i < first:
            current = "prefix"
        elif i > last:
            current = "suffix"
        seg_of[n.name] = current
    for n in reversed(nodes):  # weight-only nodes run where they are first used
        if n.name in const:
            users = [u for u in n.users if u.op == "call_function"]
            seg_of[n.name] = seg_of.get(users[0].name, "suffix") if users else "suffix"
    order = ["prefix", *(f"layer.{i}" for i in range(max(layer_of[nodes[p].name] for p in pos) + 1)), "suffix"]
    rank = {k: i for i, k in enumerate(order)}
    segs = {k: Segment(k, int(k.split(".")[1]) if k.startswith("layer.") else None, []) for k in order}
    for n in nodes:
        if n.op == "call_function":
            segs[seg_of[n.name]].nodes.append(n)
        elif n.op == "output":
            segs["suffix"].nodes.append(n)
    # values each segment must keep for later ones
    last_reader: dict[str, int] = {}
    for k in order:
        for n in segs[k].nodes:
            if n.name in const:
                segs[k].consts.add(n.name)
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    if a.target not in segs[k].weights:
                        segs[k].weights.append(a.target)
                    continue
                src = rank.get(seg_of.get(a.name, "prefix"), 0)
                if src > rank[k]:
                    raise PtqcError(f"node {n.name} ({k}) reads {a.name}, computed later in {order[src]}")
                last_reader[a.name] = max(last_reader.get(a.name, -1), rank[k])
    for k in order:
        segs[k].keep = {name for name, r in last_reader.items()
                        if r > rank[k] and rank.get(seg_of.get(name, "prefix"), 0) <= rank[k]}
    return [segs[k] for k in order]


def _weight_only(n: fx.Node) -> bool:
    """Is n computed from weights only (get_attr nodes, through any number of ops)?"""
    return n.op == "get_attr" or (n.op == "call_function" and bool(n.all_input_nodes)
                                  and all(_weight_only(a) for a in n.all_input_nodes))


def _finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in x (two reductions, no temporary the size of x; max/min propagate NaN)."""
    return x.numel() == 0 or bool(torch.isfinite(x.amax()) & torch.isfinite(x.amin()))


Hook = Callable[[fx.Node, tuple, object, int], None]  # (node, input values, output, batch index)


class _SegmentInterpreter(Interpreter):
    """One segment of a :class:`LayerRunner` over its batches: weights (``overrides`` first) and
    weight-only nodes are computed once; ``hook`` and the observers ({node: {name: observer}})
    see every computed value."""

    def __init__(self, runner: "LayerRunner", seg: Segment, overrides: dict | None = None,
                 hook: Hook | None = None, observers: dict | None = None):
        store = runner.qm.store
        super().__init__(seg.nodes, ChainMap(overrides, store) if overrides else store, device=runner.device,
                         keep=seg.keep, const=seg.consts)
        self.runner, self.seg, self.hook = runner, seg, hook
        self.observers = {n.name: o for n, o in (observers or {}).items()}
        self.batch = 0

    def missing(self, a):
        """Weights, and weight-only nodes a pass inserted after the split (run_staged): computed once."""
        if not _weight_only(a):
            raise PtqcError(f"segment {self.seg.key}: value {a.name} is not available (run the earlier "
                            "segments first)")
        if a.name not in self.consts:
            self.consts[a.name] = self.fetch_attr(a) if a.op == "get_attr" else self.call_function(
                a, fx.node.map_arg(a.args, self.missing), fx.node.map_arg(a.kwargs, self.missing))
        return self.consts[a.name]

    def after_node(self, n, args, y):
        for o in self.observers.get(n.name, {}).values():
            self.runner.observe(n, o, args if o.where == "call" else args[getattr(o, "arg", 0)]
                                if o.where == "input" else y)
        if self.hook is not None:
            self.hook(n, args, y, self.batch)


class LayerRunner:
    """Runs a QModel segment by segment over a fixed set of token batches.

    ``state[b]`` holds, for batch ``b``, the values that later segments read. ``run(key)``
    executes one segment for all batches: with ``commit=True`` its results replace the
    state (the model advances one segment), with ``commit=False`` the state is untouched (an
    observation run). ``overrides`` maps tensor names to replacement tensors for this run.
    """

    def __init__(self, qm: QModel, batches: list[torch.Tensor], device=None, check_finite: bool = True):
        self.qm = qm
        self.device = torch.device(device) if device is not None else None
        ph = [n for n in qm.graph.nodes if n.op == "placeholder"]
        if len(ph) != 1:
            raise PtqcError(f"expected one graph input (input_ids), found {len(ph)}")
        self.state = [{ph[0].name: b.to(self.device) if self.device else b} for b in batches]
        self.check_finite = check_finite
        self._frozen: dict[str, Segment] | None = None

    @property
    def state(self) -> Batches:
        return self._state

    @state.setter
    def state(self, items) -> None:
        """Per-batch values, spilled to the store's offload directory beyond its activation budget."""
        self._state = Batches.for_store(self.qm.store, items)

    def segments(self) -> dict[str, Segment]:
        return self._frozen if self._frozen is not None else {s.key: s for s in split(self.qm.graph)}

    def freeze(self) -> dict[str, Segment]:
        """Split the graph once and reuse the segments: for callers that run many segments
        without changing the graph (evaluation, diagnostics). Passes that rewrite must not."""
        self._frozen = {s.key: s for s in split(self.qm.graph)}
        return self._frozen

    @property
    def num_layers(self) -> int:
        return len(self.segments()) - 2

    def run(self, key: str, *, commit: bool = True, hook: Hook | None = None, observers: dict | None = None,
            overrides: dict | None = None, batches: Iterator[int] | None = None,
            on_output: Callable[[int, object], None] | None = None, release: bool = True) -> None:
        """Execute segment ``key`` on every batch (or the given batch indices). The segment's
        weights are released afterwards unless ``release=False`` (a caller running one batch
        at a time releases them itself with ``qm.store.release()``)."""
        seg = self.segments()[key]
        it = _SegmentInterpreter(self, seg, overrides, hook, observers)
        for b in range(len(self.state)) if batches is None else batches:
            env = dict(self.state[b])
            it.batch = b
            out = it.run(env)
            if on_output is not None and out is not None:
                on_output(b, out)
            if commit:
                self.state[b] = {k: env[k] for k in seg.keep if k in env}
        if release:
            self.qm.store.release(seg.weights)

    def observe(self, n: fx.Node, o, x) -> None:
        """Feed observer ``o`` of node ``n`` the value ``x`` (``where="call"``: all its input
        values, the first checked), stopping on a non-finite one."""
        if self.check_finite and not _finite(x[0] if o.where == "call" else x):
            m = n.meta.get("ptqc", {})
            raise PtqcError(f"non-finite (NaN/Inf) activation at the {o.where} of {m.get('module')} "
                            f"(layer {m.get('layer')}, node {n.name}) during calibration; check the "
                            "model in float (ptqc eval) and the passes before this one")
        o.update(x)

    def run_staged(self, key: str, stages: list[tuple[dict, Callable[[], None]]]) -> None:
        """Run segment ``key`` once (committed), pausing before each stage's observed nodes
        ({node: {name: observer}}, ``where="input"``): they are fed for every batch, then the
        stage's callback may rewrite those nodes' weights and execution continues with the new
        ones. Every node runs once per batch; all batches' live values are kept between stages (in
        ``state``, so they spill to disk like it)."""
        seg = self.segments()[key]
        order = {n.name: i for i, n in enumerate(seg.nodes)}
        it = _SegmentInterpreter(self, seg)
        envs = self.state
        pos = 0
        for obs, callback in sorted(stages, key=lambda st: min(order[n.name] for n in st[0])):
            stop = min(order[n.name] for n in obs)
            for b in range(len(envs)):
                env = dict(envs[b])
                it.run(env, seg.nodes[pos:stop])
                for n, named in obs.items():
                    for o in named.values():
                        self.observe(n, o, fx.node.map_arg(n.args, lambda a: env[a.name] if a.name in env
                                                           else it.missing(a)) if o.where == "call"
                                     else env[n.args[getattr(o, "arg", 0)].name])
                envs[b] = env
            pos = stop
            callback()
            it.consts.clear()  # weights may have been rewritten
        for b in range(len(envs)):
            env = dict(envs[b])
            it.run(env, seg.nodes[pos:])
            envs[b] = {k: env[k] for k in seg.keep if k in env}
        self.qm.store.release(seg.weights)

    # ---- conveniences --------------------------------------------------------------------------
    def run_prefix(self) -> None:
        self.run("prefix")

    def run_layer(self, i: int, **kw) -> None:
        self.run(f"layer.{i}", **kw)


def calibration_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(ids, batch_size)) if ids.ndim == 2 else [ids[None]]


def _stages(obs: dict, propagate: str) -> list[dict]:
    """The observer groups ``apply`` is called with: all of them, or with ``"sequential"`` one per
    observed input (a ``"call"`` observer, e.g. of MoE experts, is a stage of its own)."""
    if propagate != "sequential":
        return [obs]
    by_input: dict = {}
    for node, named in obs.items():
        call = any(o.where == "call" for o in named.values())
        by_input.setdefault(node if call else node.args[0], {})[node] = named
    return list(by_input.values())


def _replay(qm: QModel, ck, loop: int, i: int, obs: dict | None, apply, propagate: str) -> None:
    """A checkpointed layer: its saved observers back in place, ``apply`` on them in the saved order."""
    if obs:
        stages = {frozenset(n.name for n in st): st for st in _stages(obs, propagate)}
        for names, saved in ck.stats(loop, i):
            st = stages[frozenset(names)]
            resume.restore(st, saved)
            apply(i, st)
        qm.store.release()


def _layer(runner: LayerRunner, i: int, obs: dict | None, apply, propagate: str) -> list:
    """Calibrate one layer (see module doc); returns the stages in the order ``apply`` saw them."""
    done: list = []

    def applied(st):
        distributed.reduce_stage(st)
        done.append(([n.name for n in st], st))
        apply(i, st)

    if not obs:
        runner.run_layer(i)
        return done
    distributed.reseed(obs)
    if propagate == "sequential":  # one stage per observed input, apply(i, that stage's stats)
        runner.run_staged(f"layer.{i}", [(st, (lambda st=st: applied(st))) for st in _stages(obs, propagate)])
    else:
        runner.run_layer(i, observers=obs, commit=propagate == "float")
        applied(obs)
        if propagate == "quantized":
            runner.run_layer(i)
    runner.qm.store.release()
    return done


def calibrate(qm: QModel, ctx, observe: Callable[[int], dict], apply: Callable[[int, dict], None], *,
              propagate: str = "quantized", layers=None, desc: str = "calibrate") -> dict:
    """The layer-by-layer calibration loop (see module doc). Returns a small summary. With
    ``ctx.checkpoints`` (:class:`ptqc.resume.Checkpoints`) every layer is checkpointed, and the
    layers a killed run checkpointed are replayed from their saved observers."""
    if propagate not in ("quantized", "float", "sequential"):
        raise PtqcError(f"propagate={propagate!r}: use 'quantized', 'float' or 'sequential'")
    ids = ctx.calibration_ids(qm)
    ck = getattr(ctx, "checkpoints", None)
    batches = distributed.shard(calibration_batches(ids, ctx.calib_batch_size))  # this rank's share
    runner = LayerRunner(qm, batches, device=ctx.device)
    n = runner.num_layers
    loop = ck.next_loop() if ck else 0
    skip = ck.resume_point(loop, n) if ck else 0
    if skip == 0:
        runner.run_prefix()
    wanted = set(range(n) if layers is None else layers)
    for i in ctx.progress(range(n), desc=desc, unit="layer"):
        obs = observe(i) if i in wanted else None
        if i < skip:
            _replay(qm, ck, loop, i, obs, apply, propagate)
            if i == skip - 1 < n - 1:
                runner.state = ck.acts(loop, i)
            continue
        done = _layer(runner, i, obs, apply, propagate)
        if ck:
            ck.save_layer(loop, i, done, runner.state)
        del obs, done  # a layer's statistics (per-expert Hessians: E x [in, in]) end with it
    if ck:
        ck.loop_done(loop, n)
    return {"layers": len(wanted & set(range(n))), "samples": int(ids.shape[0]),
            "tokens": int(ids.numel()), "propagate": propagate}
