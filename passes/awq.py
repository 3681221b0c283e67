"""awq: activation-aware weight quantization (Lin et al., 2023).

A few input channels carry much larger activations than the rest; their weights matter more.
AWQ multiplies those weight columns by a per-input-channel scale ``s`` before quantizing (so
they get finer effective steps) and divides the activation by ``s``, folding ``1/s`` into the
op that produces the activation, so the float model is unchanged:

    input_norm  -> q, k, v      norm weight / s         q, k, v columns * s
    post_norm   -> gate, up     norm weight / s         gate, up columns * s
    v_proj      -> o_proj       v rows (and bias) / s   o columns * s     (only when v and o
                                                                            have the same width;
                                                                            with GQA it is skipped,
                                                                            as in AutoAWQ)
    up_proj     -> down_proj    up rows / s             down columns * s

Gemma-style norms ``x * (1 + w)`` are folded as ``(1 + w) / s - 1``.

Scale search (AutoAWQ's), per layer, on the float layer: for each group of linears sharing an
input, the candidates ``s = mean|x|^a / (mean|w|^(1-a) + 1e-4)`` (``mean|w|`` of the
group-normalized weights), normalized by ``sqrt(max(s) min(s))``, for ``a`` in ``k/grid``,
k = 0..grid-1, and no scaling, are scored by the mean squared error of the output of the block
the group feeds (AutoAWQ's ``module2inspect``: the attention block up to o_proj for q/k/v, the MLP
for gate/up, the linear itself for v -> o and up -> down) with the group's weights replaced by
``Q(W s) / s``, against the float block, on ``windows`` calibration windows; the block runs the
layer's own graph nodes. All groups of a layer are searched before any scale is folded; the next
layer reads the float layer's output.

Clip search (``clip=true``, AutoAWQ's): for every linear except q/k (attention logits are
sensitive), scaled or not (o_proj under GQA), per output row and group, weights are clamped to
``[-r m, r m]`` (``m``: the group's max |w|; the other end of an asymmetric group keeps its
range) with the r in 1, 0.95, ... 0.55 giving the lowest error of the group's partial outputs
on 512 of the samples.

MoE blocks (:mod:`ptqc.passes.awq_moe`): one searched scale for the block input shared by every
expert's gate/up and the shared expert, folded into the norm with the router compensated; a
searched scale per expert for its down_proj input on its routed tokens, folded into its up_proj
rows; clip search per expert; ``min_tokens`` / ``few_tokens`` / ``all_experts`` as in gptq.

Then (``quantize=true``, default) the weights are quantized round-to-nearest with the shared
quantizer. With ``quantize=false`` only scales and clipping are applied, for pipelines such as
``awq:quantize=false,gptq``.
"""
from __future__ import annotations

import importlib
from collections import ChainMap
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ptqc import experts, ops, quant
from ptqc.calib import LayerRunner, calibration_batches
from ptqc.interpreter import Interpreter
from ptqc.errors import PtqcError
from ptqc.experts import ExpertSite
from ptqc.ir import info, is_op
from ptqc.norms import is_norm
from ptqc.observers import MeanAbs, Samples
from ptqc.options import WeightOptions
from ptqc.patterns import activation_input, is_transparent, producer_linear, skip_transparent
from ptqc.pipeline import Pass, PassResult, register
from ptqc.weights import fold_input_scale, plan, select_linears, set_quantized_weight, weight_of

awq_moe = importlib.import_module("ptqc.passes.awq_moe")


def scale_candidates(x_mean: torch.Tensor, W: torch.Tensor, group: int, grid: int):
    """AutoAWQ's duo-scaling grid: ``(a, s)`` with ``s = mean|x|^a / (mean|w|^(1-a) + 1e-4)``
    (``mean|w|``: column mean of |W| normalized by each (row, group) max), clamped at 1e-4 and
    divided by ``sqrt(max(s) min(s))``, for a = k/grid, k = 0..grid-1."""
    g = group if group > 0 else W.shape[1]
    wg = W.abs().reshape(W.shape[0], -1, g)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(W.shape).mean(0)
    for k in range(grid):
        a = k / grid
        s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        yield a, torch.where(torch.isfinite(s), s, torch.ones_like(s))


def search_scale(x_mean: torch.Tensor, ws: list[torch.Tensor], spec: quant.QuantSpec, grid: int,
                 loss) -> tuple[torch.Tensor, dict]:
    """The per-input-channel scale among :func:`scale_candidates` (and no scaling) of the linears
    ``ws`` (each [out, in]) with the lowest ``loss(s)``."""
    best_s, best_a = torch.ones_like(x_mean), None
    base = best = loss(best_s)
    for a, s in scale_candidates(x_mean, torch.cat(ws), spec.group_size, grid):
        cur = loss(s)
        if cur < best:
            best, best_s, best_a = cur, s, a
    return best_s, {"alpha": best_a, "loss_before": base, "loss_after": best}


class Block:
    """What one scaling group is scored on (AutoAWQ's ``module2inspect``): after a norm, the
    first linear its linears reach (o_proj for q/k/v: the attention block; down_proj for gate/up:
    the MLP), after a linear (v -> o, up -> down) the linears themselves. The block's nodes run
    with the layer's own graph on the float values at their start (``snapshots``, one env per
    calibration batch); :meth:`loss` is the mean squared error of its output with some weights
    replaced, against the float output."""

    def __init__(self, qm, seg, prev: fx.Node, lins: list[fx.Node], snapshots: list[dict], device=None,
                 outputs: list[fx.Node] | None = None):
        self.qm, self.consts, self.device = qm, seg.consts, device
        self.outs = outputs or self._outputs(seg.nodes, prev, lins)
        pos = {n: i for i, n in enumerate(seg.nodes)}
        start, need, todo = min(pos[n] for n in lins), set(), list(self.outs)
        while todo:  # the outputs' ancestors from the block's start on (weight-only nodes anywhere)
            n = todo.pop()
            if n not in need and n in pos and (pos[n] >= start or n.name in seg.consts):
                need.add(n)
                todo.extend(n.all_input_nodes)
        self.nodes = [n for n in seg.nodes if n in need]
        self.snapshots = snapshots
        self.refs = self._run({})

    @staticmethod
    def _outputs(nodes, prev, lins) -> list[fx.Node]:
        """The first linear downstream of every linear of the group (MLA's q_a/kv_a: o_proj, not
        q_b_proj), else the first downstream of any, else the group itself."""
        if not is_norm(prev):
            return list(lins)
        reach = {x: {x} for x in lins}  # node -> the group's linears it depends on
        first = None
        for n in nodes[min(nodes.index(x) for x in lins):]:
            deps = set().union(*(reach.get(a, ()) for a in n.all_input_nodes))
            if n in reach or not deps:
                continue
            if is_op(n, ops.LINEAR):
                first = first or n
                if len(deps) == len(lins):
                    return [n]
            reach[n] = deps
        return [first] if first is not None else list(lins)

    def _run(self, overrides: dict) -> list[list[torch.Tensor]]:
        it = Interpreter(self.nodes, ChainMap(overrides, self.qm.store), device=self.device, const=self.consts)
        out = []
        for snap in self.snapshots:
            env = dict(snap)
            it.run(env)
            out.append([env[o.name].float() for o in self.outs])
        return out

    def loss(self, overrides: dict) -> float:
        """Mean squared error of the block's output with weights ``overrides`` {tensor name: value}."""
        err = count = 0
        for ys, refs in zip(self._run(overrides), self.refs):
            for y, r in zip(ys, refs):
                err += (y - r).pow(2).sum().item()
                count += y.numel()
        return err / max(count, 1)


def snapshots(qm, seg, inputs: list[dict], starts: list[int], device=None) -> dict[int, list[dict]]:
    """The live float values of segment ``seg`` just before each node index in ``starts``, per
    batch (``inputs``: the segment's input environments)."""
    it = Interpreter(seg.nodes, qm.store, device=device, keep=seg.keep, const=seg.consts)
    out: dict[int, list[dict]] = {s: [] for s in starts}
    for env0 in inputs:
        env, pos = dict(env0), 0
        for s in sorted(out):
            it.run(env, seg.nodes[pos:s])
            out[s].append(dict(env))
            pos = s
    return out


def search_clip(x: torch.Tensor, w: torch.Tensor, spec: quant.QuantSpec, grid: int = 20, max_shrink: float = 0.5,
                tokens: int = 512, rows_per_batch: int = 256) -> torch.Tensor:
    """Clamp ``w`` per (row, group) to ``[-r m, r m]``, m the group's max |w|, with the r in 1, 1 - 1/grid,
    ... > 1 - max_shrink minimizing the group's output error on ``tokens`` rows of ``x`` (AutoAWQ)."""
    g = spec.group_size if spec.group_size > 0 else w.shape[1]
    x = x[::max(1, x.shape[0] // tokens)]
    xg = x.reshape(x.shape[0], -1, g)  # [n, groups, g]
    out = []
    for r0 in range(0, w.shape[0], rows_per_batch):
        wb = w[r0:r0 + rows_per_batch]
        wg = wb.reshape(wb.shape[0], -1, g)  # [rows, groups, g]
        ref = torch.einsum("ngc,rgc->nrg", xg, wg)
        m = wg.abs().amax(-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], float("inf"))
        best = wg
        for i in range(int(grid * max_shrink)):
            cw = torch.maximum(torch.minimum(wg, m * (1 - i / grid)), -m * (1 - i / grid))
            q = quant.fake_quantize(cw.reshape(wb.shape), spec).reshape(wg.shape)
            err = (torch.einsum("ngc,rgc->nrg", xg, q) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], cw, best)
        out.append(best.reshape(wb.shape))
    return torch.cat(out)


@register
class AWQ(Pass):
    """AWQ: activation-aware per-channel scales folded into the previous norm/linear, clip search, RTN.

    Scales are searched on the block each group feeds (grid over the exponent a of mean|x|^a) and folded
    exactly into the preceding RMSNorm (q/k/v, gate/up) or linear (v -> o, up -> down); weights are
    then clipped and quantized (`quantize=false`: fold and clip only, e.g. before gptq).
    """

    name = "awq"
    experts = True
    requires = frozenset({"canonical"})
    provides = frozenset({"weight_quant", "awq_scaled"})

    @dataclass
    class Options(WeightOptions):
        grid: int = 20
        clip: bool = True
        quantize: bool = True
        samples: int = 512  # token rows per input for mean|x| samples and the clip search
        windows: int = 32  # calibration windows the scale search scores on (0: all)
        all_experts: bool = False  # MoE: per-expert statistics from every token, not only the routed ones
        min_tokens: int = 16  # experts routed fewer tokens take `few_tokens`
        few_tokens: Literal["rtn", "all"] = "rtn"  # no scale and no clip, or the all-token statistics

        def validate(self):
            super().validate()
            if self.grid < 1 or self.samples < 1 or self.windows < 0 or self.min_tokens < 0:
                raise PtqcError("grid and samples must be >= 1, windows and min_tokens >= 0")

    def __init__(self, **options):
        super().__init__(**options)
        if not self.options.quantize:  # fold and clip only: the weights stay float (checked after the pass)
            self.provides = frozenset({"awq_scaled"})

    def run(self, qm, ctx) -> PassResult:
        o = self.options
        self.stack_records: list[dict] = []
        planned = plan(qm, self)
        spec_of = {n.name: spec for n, _, spec in planned}
        folds, moe = self._groups(qm, spec_of), self._moe(qm, planned)
        records: list[dict] = []
        ids = ctx.calibration_ids(qm)
        runner = LayerRunner(qm, calibration_batches(ids, ctx.calib_batch_size), device=ctx.device)
        runner.run_prefix()
        n_search = -(-o.windows // ctx.calib_batch_size) if o.windows else len(runner.state)
        for i in ctx.progress(range(runner.num_layers), desc="awq", unit="layer"):
            if i not in folds and i not in moe:
                runner.run_layer(i)
                continue
            groups, blocks = folds.get(i, []), moe.get(i, [])
            inputs, stats = runner.state[:n_search], self._observers(qm, i, groups, blocks, spec_of)
            runner.run_layer(i, observers=stats)  # float propagation: the next layer sees this float layer
            records += self._apply(qm, ctx, runner.segments()[f"layer.{i}"], groups, blocks, spec_of, stats, inputs)
            qm.store.release()
        if o.quantize:  # linears outside the calibrated layers (e.g. an included lm_head) still get quantized
            for n in select_linears(qm, o.include, o.exclude):
                if n.name in spec_of:
                    self._clip_quantize(qm, n, spec_of[n.name], None, False)
        gain = [r["loss_after"] / r["loss_before"] for r in records if r.get("loss_before", 0) > 0]
        summary = {"layers": len({*folds, *moe}), "samples": int(ids.shape[0]), "tokens": int(ids.numel()),
                   "propagate": "float", "groups_scaled": len(records), "linears": len(spec_of),
                   "mean_loss_ratio": round(sum(gain) / max(len(gain), 1), 4), "scales": records}
        stacks = {r["module"]: {"tokens": r["tokens"], "fallback": r["fallback"]} for r in self.stack_records}
        return PassResult(changed=bool(spec_of), summary={**summary, **({"experts": stacks} if stacks else {})})

    def _groups(self, qm, spec_of) -> dict[int, list]:
        """Scaling groups per layer: (the op producing the input, all linears reading it), foldable."""
        moe_inputs = {skip_transparent(n.args[0]) for n in qm.nodes(ops.MOE_EXPERTS)}
        readers: dict = {}
        for n in qm.linears():
            readers.setdefault(activation_input(n), []).append(n)
        folds: dict[int, list] = {}
        for src, lins in readers.items():
            layer = lins[0].meta["ptqc"].get("layer")
            if layer is None or src in moe_inputs or not any(n.name in spec_of for n in lins):
                continue
            prev = src if is_norm(src) else producer_linear(qm, lins[0])
            if prev is not None and self._foldable(qm, prev, lins):
                folds.setdefault(layer, []).append((prev, lins))
        return folds

    def _moe(self, qm, planned) -> dict[int, list]:
        """layer -> [(experts node, its options)] for MoE blocks with an expert stack or a block input reader to quantize."""
        names = {n.name: mo for n, mo, _ in planned}
        out: dict[int, list] = {}
        for node in qm.nodes(ops.MOE_EXPERTS):
            own = [ExpertSite(node, p).name for p in experts.PROJS] + [n.name for n in experts.block_input(qm, node)[1]]
            mos = [names[k] for k in own if k in names]
            if mos:
                out.setdefault(info(node)["layer"], []).append((node, mos[0]))
        return out

    def _observers(self, qm, i, groups, blocks, spec_of) -> dict:
        """Each group's input (mean |x|, samples), and the input of unscaled linears to clip (GQA o_proj);
        at MoE experts nodes, x and per-expert statistics (:func:`awq_moe.observers`)."""
        o = self.options
        grouped = {n for _, lins in groups for n in lins}
        for node, _ in blocks:
            src, lins, why = experts.block_input(qm, node)
            grouped |= set(lins) if why is None else set()
        obs = {n: {"x": Samples(max_tokens=o.samples)} for n in qm.linears(layer=i) if o.clip and
               n.name in spec_of and n not in grouped and n.meta["ptqc"]["role"] not in ("q", "k")}
        obs |= {node: awq_moe.observers(qm, node, mo, o.samples) for node, mo in blocks}
        return obs | {lins[0]: {"x": Samples(max_tokens=o.samples), "mean": MeanAbs()} for _, lins in groups}

    def _apply(self, qm, ctx, seg, groups, blocks, spec_of, stats, inputs) -> list[dict]:
        """As AutoAWQ, per layer: search every group's scale on the float layer (scored on its
        block's output), fold them all, then clip and quantize each linear on its scaled input."""
        pos = {n: k for k, n in enumerate(seg.nodes)}
        starts = {min(pos[n] for n in lins) for _, lins in groups}
        starts |= {min(pos[n] for n in [node, *experts.block_input(qm, node)[1]]) for node, _ in blocks}
        snaps = snapshots(qm, seg, inputs, sorted(starts), ctx.device)
        moe_found = [self._search_moe(qm, ctx, seg, node, mo, spec_of, stats[node], snaps, pos) for node, mo in blocks]
        found, records = [], [r for *_, recs in moe_found for r in recs]
        for prev, lins in groups:
            block = Block(qm, seg, prev, lins, snaps[min(pos[n] for n in lins)], ctx.device)
            ws = {n.args[1].target: (weight_of(qm, n).float(), spec_of[n.name]) for n in lins if n.name in spec_of}

            def loss(s, ws=ws, block=block):  # Q(W s) / s in place of W, the rest of the block float
                return block.loss({k: (quant.fake_quantize(w * s, sp) / s).to(qm.dtype) for k, (w, sp) in ws.items()})

            s, rec = search_scale(stats[lins[0]]["mean"].result(), [w for w, _ in ws.values()],
                                  next(iter(ws.values()))[1], self.options.grid, loss)
            found.append((prev, lins, s))
            records.append({"layer": seg.layer, "into": prev.meta["ptqc"].get("module"),
                            "linears": [n.meta["ptqc"]["role"] for n in lins],
                            **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in rec.items()}})
        xs = {}
        for prev, lins, s in found:
            fold_input_scale(qm, prev, lins, s)
            xs |= {n.name: stats[lins[0]]["x"].result().float() / s for n in lins}
        for node, s, s_down, _ in moe_found:
            if s is not None:
                xs |= {n.name: stats[node]["x"].result().float() / s for n in awq_moe.fold_block(qm, node, s)}
            if s_down is not None:
                experts.fold_down_scale(qm, node, s_down)
        for n in qm.linears(layer=seg.layer):
            if n.name in spec_of:
                x = xs[n.name] if n.name in xs else stats[n]["x"].result().float() if n in stats else None
                self._clip_quantize(qm, n, spec_of[n.name], x, n.name in xs)
        for (node, mo), (_, s, s_down, _) in zip(blocks, moe_found):
            self._clip_quantize_stacks(qm, node, mo, spec_of, stats[node]["acts"], s, s_down)
        return records

    def _search_moe(self, qm, ctx, seg, node, mo, spec_of, st, snaps, pos) -> tuple:
        """(node, block input scale or None, per-expert down scales or None, records) of one MoE block,
        searched on the float layer."""
        src, lins, why = experts.block_input(qm, node)
        srcs = awq_moe.stack_sources(st["acts"], mo)
        s = s_down = None
        recs = []
        readers = [ExpertSite(node, "gate"), ExpertSite(node, "up"), *lins]
        if why is None and any(n.name in spec_of for n in readers):
            start = min(pos[n] for n in [node, *lins])
            block = Block(qm, seg, src, [node, *lins], snaps[start], ctx.device, outputs=[awq_moe.block_output(seg, node)])
            s, quantized, rec = awq_moe.search_block(qm, node, lins, spec_of, block, st["mean"].result(), mo.grid)
            recs.append({"layer": seg.layer, "into": info(src).get("module"),
                         "linears": [f"experts.{n.proj}" if isinstance(n, ExpertSite) else info(n)["role"] for n in quantized],
                         "compensated": [info(n)["role"] for n in lins if n.name not in spec_of],
                         **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in rec.items()}})
        down = ExpertSite(node, "down")
        if down.name in spec_of:
            s_down, gains = awq_moe.search_down(qm, node, spec_of[down.name], st["acts"], srcs, mo.grid)
            recs.append({"layer": seg.layer, "into": f"{info(node)['module']}.up_proj", "linears": ["experts.down"],
                         "experts_scaled": len(gains), "mean_loss_ratio": round(sum(gains) / max(len(gains), 1), 4)})
        return node, s, s_down, recs

    def _clip_quantize_stacks(self, qm, node, mo, spec_of, acts, s, s_down) -> None:
        srcs = awq_moe.stack_sources(acts, mo)
        for site in (ExpertSite(node, p) for p in experts.PROJS):
            if site.name in spec_of:
                x_scale = s if s is not None else torch.ones(())
                h_scale = s_down if s_down is not None else torch.ones(len(srcs), 1)
                scaled = s_down is not None if site.proj == "down" else s is not None
                rec = awq_moe.clip_quantize_stack(qm, site, spec_of[site.name], acts, srcs, x_scale, h_scale, mo, scaled)
                self.stack_records.append({"module": site.module, **rec})

    def _clip_quantize(self, qm, n, spec: quant.QuantSpec, x: torch.Tensor | None, scaled: bool) -> None:
        """Clip search on the sampled input ``x`` (as AutoAWQ: every linear but q/k, scaled or not),
        then quantize (``quantize=true``)."""
        w = weight_of(qm, n).float()
        clip = self.options.clip and x is not None and n.meta["ptqc"]["role"] not in ("q", "k")
        if clip:
            w = search_clip(x, w, spec)
            qm.store[n.args[1].target] = w.to(qm.dtype)
        if self.options.quantize:
            set_quantized_weight(qm, n, spec, *quant.rtn(w, spec), "awq",
                                 {"scaled": scaled, "clipped": clip})

    @staticmethod
    def _foldable(qm, prev, lins) -> bool:
        """The fold is exact only if ``prev``'s output reaches nothing but these linears."""
        if is_norm(prev):  # users through shape ops (MLA's kv_a_layernorm -> view -> kv_b_proj)
            ends, todo = [], list(prev.users)
            while todo:
                u = todo.pop()
                todo.extend(u.users) if is_transparent(u) else ends.append(u)
            return all(is_op(u, ops.LINEAR) and activation_input(u) is prev for u in ends)
        out_ch = qm.store.spec(prev.args[1].target)[0][0]
        in_ch = qm.store.spec(lins[0].args[1].target)[0][1]
        return out_ch == in_ch and len(lins) == 1  # v -> o without GQA, up -> down
