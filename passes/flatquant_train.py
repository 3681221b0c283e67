"""flatquant's training: decoder layer by decoder layer on the float model's layer inputs, AdamW
(clips at 10x lr, cosine schedule to lr/1000) on the MSE between the quantized layer's output and
the float layer's output (see :mod:`ptqc.passes.flatquant`).

The layer's inputs are the runner's batches, read (and cast to float32) one at a time, and its
float targets go to an :class:`ptqc.activations.Batches` with what is left of the activation
budget, so both stay on disk past ``--offload-mb`` as the calibration activations do."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ptqc.activations import Batches
from ptqc.calib import LayerRunner, split
from ptqc.errors import PtqcError
from ptqc.passes.flatquant_model import EagerLayer, LayerModel, f32, layer_weights


def _mse(out: dict, ref: dict) -> torch.Tensor:
    return sum(F.mse_loss(out[k].float(), ref[k].float()) for k in ref) / max(len(ref), 1)


def _r(v: float) -> float:
    return float(f"{v:.6g}")


class Float32:
    """Batches of values as float32, cast as each is read (a spilled batch is read from disk)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return ({k: f32(v) for k, v in st.items()} for st in self.batches)


def float_targets(model: LayerModel, states, store, reserved: int = 0) -> tuple[Batches, dict]:
    """Float outputs (targets) of the layer, in :meth:`Batches.for_store` of ``store`` (its activation
    budget less ``reserved``), and the per-channel max |x| of each scaled group's input."""
    stats: dict = {}
    srcs = {g.src.name: g.gid for g in model.plan.groups if g.prev is not None}

    def record(n, y):
        if n.name in srcs:
            m = y.detach().reshape(-1, y.shape[-1]).abs().amax(0).float()
            gid = srcs[n.name]
            stats[gid] = m if gid not in stats else torch.maximum(stats[gid], m)

    def outputs(st):
        env = dict(st)
        EagerLayer(model, hook=record).run(env)
        return {k: env[k].detach() for k in model.outputs}

    with torch.no_grad():
        targets = Batches.for_store(store, (outputs(st) for st in states), reserved)
    return targets, stats


def _evaluate(model: LayerModel, states, targets) -> float:
    with torch.no_grad():
        mats = model.matrices()
        return sum(_mse(model.forward(st, mats), t).item() for st, t in zip(states, targets)) / len(states)


def _optimize(model: LayerModel, states, targets, groups, lr: float, epochs: int) -> list[float]:
    """AdamW over ``epochs`` passes of the batches; the mean loss of each epoch."""
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(states), eta_min=lr * 1e-3)
    epoch_losses = []
    for ep in range(epochs):
        total = 0.0
        for st, tgt in zip(states, targets):
            loss = _mse(model.forward(st), tgt)
            if not torch.isfinite(loss):
                layer = model.plan.layer
                raise PtqcError(f"flatquant: non-finite loss in layer {layer} at epoch {ep}; lower its lr "
                                f"(recipe overrides: {{match: \"layers.{layer}.*\", lr: ...}})")
            total += loss.item()
            opt.zero_grad(set_to_none=True)
            if loss.item() > 0:
                (loss / loss.detach()).backward()  # FlatQuant's normalised step
                opt.step()
            sched.step()
        epoch_losses.append(total / len(states))
    return epoch_losses


def train_layer(qm, ctx, plan, seg, states, *, epochs: int, options) -> tuple[dict, dict]:
    """Train one layer's parameters on its float inputs ``states``; returns them and the layer's record."""
    o, lo = options, plan.opts
    dev = ctx.device
    weights = layer_weights(qm, seg, dev)
    held = states.in_memory()
    states = Float32(states)
    targets, stats = float_targets(LayerModel(qm, plan, seg, weights, dev, params={}), states, qm.store, held)
    model = LayerModel(qm, plan, seg, weights, dev, seed=o.seed, stats=stats, kv_bits=o.kv_bits, kv_sym=o.kv_sym)
    t0 = time.perf_counter()
    power = sum(sum(t[k].float().pow(2).mean().item() for k in t) / max(len(t), 1) for t in targets) / len(targets)
    loss_init = _evaluate(model, states, targets)
    groups = model.param_groups(lo.lr)
    epoch_losses = []
    quantizing = bool(model.specs) or any(g.a_opts is not None for g in plan.groups) or o.kv_bits < 16
    trainable = quantizing and loss_init > 0 and epochs > 0 and any(gr["params"] for gr in groups)
    if trainable:
        epoch_losses = _optimize(model, states, targets, groups, lo.lr, epochs)
    for t in model.p.values():
        t.requires_grad_(False)
    loss_end = _evaluate(model, states, targets) if trainable else loss_init
    qm.store.release(seg.weights)
    rec = {"layer": plan.layer, "loss_init": _r(loss_init),
           "loss_epoch0": _r(epoch_losses[0]) if epoch_losses else None,
           "loss_end": _r(loss_end), "rel_loss_end": _r(loss_end / power if power > 0 else 0.0),
           "epoch_losses": [_r(v) for v in epoch_losses], "seconds": round(time.perf_counter() - t0, 3),
           "options": {"epochs": epochs, "lr": lo.lr, "alpha": lo.alpha, "clip": lo.clip, "w_bits": lo.w_bits,
                       "a_bits": lo.a_bits}}
    return model.export(), rec


def train_layers(qm, ctx, plans: dict, batches, epochs: dict, desc: str, options) -> tuple[dict, dict]:
    """Run the float model layer by layer, training the planned layers on their float inputs;
    returns the parameters and the records by layer."""
    params: dict[int, dict] = {}
    records: dict[int, dict] = {}
    runner = LayerRunner(qm, batches, device=ctx.device)
    runner.run_prefix()
    last = max(plans)
    for i in ctx.progress(range(last + 1), desc=desc, unit="layer"):
        if i in plans:
            seg = {s.key: s for s in split(qm.graph)}[f"layer.{i}"]
            params[i], records[i] = train_layer(qm, ctx, plans[i], seg, runner.state, epochs=epochs[i],
                                                options=options)
            r = records[i]
            ctx.info(f"flatquant layer {i}: loss {r['loss_init']:.4g} -> {r['loss_end']:.4g} "
                     f"({epochs[i]} epochs, {r['seconds']:.1f} s)")
        if i < last:
            runner.run_layer(i)
    qm.store.release()
    return params, records


def retrain_outliers(qm, ctx, plans: dict, batches, params: dict, records: dict, options) -> dict:
    """``auto``: re-train the outlier layers (by relative final loss) with auto x epochs and keep
    the better run (``params`` and ``records`` are updated); returns the summary of it."""
    from ptqc.diagnose import outliers

    o = options
    flagged, st = outliers({i: r["rel_loss_end"] for i, r in records.items()})
    auto = {"flagged": sorted(flagged), "rule": "rel_loss_end > median + 3 * 1.4826 * MAD",
            **{k: (_r(v) if v is not None else None) for k, v in st.items()}, "retrained": []}
    if not flagged:
        return auto
    ctx.info(f"flatquant auto: re-training layers {sorted(flagged)} with {o.auto}x epochs")
    new_p, new_r = train_layers(qm, ctx, {i: plans[i] for i in flagged}, batches,
                                {i: plans[i].opts.epochs * o.auto for i in flagged}, "flatquant auto", o)
    for i in sorted(flagged):
        better = new_r[i]["loss_end"] < records[i]["loss_end"]
        auto["retrained"].append({"layer": i, "epochs": new_r[i]["options"]["epochs"],
                                  "loss_end_before": records[i]["loss_end"],
                                  "loss_end_after": new_r[i]["loss_end"], "kept": "retrained" if better else "first"})
        records[i]["retrain"] = new_r[i]
        if better:
            params[i] = new_p[i]
    return auto
