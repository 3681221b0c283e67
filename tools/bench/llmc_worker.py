#!/usr/bin/env python
"""One llm-compressor configuration, run inside the llm-compressor venv (not ptqc's).

Called by tools/bench/weight_only.py, one child process per configuration:

    /tmp/llmc-venv/bin/python tools/bench/llmc_worker.py '{"model": ..., "method": "gptq", "bits": 4,
        "group": 128, "calib": calib.pt, "eval": eval.pt, "diag": diag.pt, "threads": 1, "batch_size": 8}'

* method ``rtn``: QuantizationModifier (data-free, min/max: the RTN baseline);
  ``gptq``: GPTQModifier (its defaults: block_size 128, dampening_frac 0.01, actorder "static",
  sequential pipeline with quantized-input propagation);
  ``awq``: AWQModifier (its defaults) + QuantizationModifier.
  All: targets Linear, ignore lm_head, integer weights, asymmetric, strategy group (group_size)
  or channel (group 0), activations float.
* method ``smoothquant`` (W8A8, called by tools/bench/weight_activation.py; ``bits``/``group``
  are ignored): SmoothQuantModifier(smoothing_strength=0.5, its default mappings: input norm ->
  q/k/v, post-attention norm -> gate/up) + QuantizationModifier(scheme="W8A8": int8 weights per
  output channel symmetric, int8 dynamic per-token symmetric input activations), targets Linear,
  ignore lm_head. The model stays in compressed-tensors' frozen fake-quant state, whose Linear
  forward fake-quantizes the input activation on the fly; :func:`check_act_quant` verifies that
  on one window (every quantized Linear's output equals an independent per-token int8 reference
  and differs from the weight-only one; logits differ from the float model's and from the same
  model with its quantizers disabled). ``spec["sqnr"] = false`` skips the SQNR.
* Calibration: the [n, seqlen] token windows of ``calib`` (a .pt LongTensor) as a Dataset of
  ``input_ids`` and ``attention_mask`` (ones); ``max_seq_length`` = seqlen,
  ``num_calibration_samples`` = n.
* After ``oneshot`` the worker writes each quantized Linear's fake-quantized weight in place
  (compressed-tensors ``fake_quantize`` with the module's scheme/scale/zero point, what its
  forward does; GPTQ already stored on-grid weights, QuantizationModifier keeps float weights
  and quantizes in forward) and checks that every targeted Linear has ``weight_scale`` /
  ``weight_zero_point``, that its weight lies on that grid and that it differs from the float one.
* PPL: plain transformers forward over the windows of ``eval`` ([n, seqlen] LongTensor), mean
  next-token NLL over all windows (ptqc's protocol). SQNR: per decoder layer, the layer output
  of the quantized model on its own inputs against the float model's (ptqc.diagnose's
  "accumulated" mode) on ``diag`` windows; the mean over layers.

Prints one line ``RESULT {json}`` on stdout (``error`` holds a one-line error when the method
fails). Peak RSS is the process's own VmHWM (after oneshot and at exit).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback


def vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def scheme(bits: int, group: int) -> dict:
    w = {"num_bits": bits, "type": "int", "symmetric": False,
         "strategy": "group" if group > 0 else "channel"}
    if group > 0:
        w["group_size"] = group
    return {"group_0": {"targets": ["Linear"], "weights": w}}


def recipe(method: str, bits: int, group: int, extra: dict):
    cg = scheme(bits, group)
    if method == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        return QuantizationModifier(config_groups=cg, ignore=["lm_head"])
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier
        return GPTQModifier(config_groups=cg, ignore=["lm_head"], **extra)
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        return [AWQModifier(**extra), QuantizationModifier(config_groups=cg, ignore=["lm_head"])]
    if method == "smoothquant":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        return [SmoothQuantModifier(smoothing_strength=float(extra.get("smoothing_strength", 0.5))),
                QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])]
    raise SystemExit(f"unknown method {method}")


def materialize(model) -> int:
    """Write the fake-quantized weight into every quantized Linear (compressed-tensors'
    fake_quantize with the module's own scheme, scale and zero point: what its forward does).
    GPTQ already stores on-grid weights (a no-op); QuantizationModifier (RTN, AWQ) keeps the
    float weight and quantizes at forward time. Returns how many weights this changed."""
    import torch
    from compressed_tensors.quantization import fake_quantize

    n = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            args = getattr(getattr(m, "quantization_scheme", None), "weights", None)
            if not isinstance(m, torch.nn.Linear) or args is None or not hasattr(m, "weight_scale"):
                continue
            zp = getattr(m, "weight_zero_point", None)
            w = fake_quantize(m.weight, m.weight_scale, zp, args)
            n += not torch.equal(w, m.weight)
            m.weight.copy_(w)
    return n


def check_quantized(model, fp_state: dict, bits: int) -> dict:
    """Every quantized Linear: has scale/zero point, weight on its grid, weight changed."""
    import torch

    n, changed, off_grid, worst = 0, 0, 0, 0.0
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if not hasattr(m, "weight_scale"):
            raise RuntimeError(f"{name} has no weight_scale: not quantized")
        n += 1
        w = m.weight.detach().float()
        s = m.weight_scale.detach().float()
        zp = getattr(m, "weight_zero_point", None)
        z = torch.zeros_like(s) if zp is None else zp.detach().float()
        g = w.shape[1] // s.shape[1]
        s_ = s.repeat_interleave(g, dim=1)
        z_ = z.repeat_interleave(g, dim=1)
        q = torch.clamp(torch.round(w / s_ + z_), lo, hi)
        err = ((q - z_) * s_ - w).abs().max().item() / max(s.abs().max().item(), 1e-30)
        worst = max(worst, err)
        off_grid += err > 1e-3
        changed += not torch.equal(w, fp_state[name + ".weight"].float())
    if n == 0 or off_grid or changed < n:
        raise RuntimeError(f"quantization check failed: {n} linears, {off_grid} off the grid, "
                           f"{changed} changed")
    return {"linears": n, "changed": changed, "max_grid_err_in_scales": worst}


def ref_per_token(x, bits: int = 8):
    """Independent symmetric per-token fake quantization (compressed-tensors' convention:
    scale = absmax / ((2^bits - 1) / 2), codes clamped to [-2^(bits-1), 2^(bits-1) - 1])."""
    import torch

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = (x.abs().amax(-1, keepdim=True) / ((hi - lo) / 2)).clamp_min(torch.finfo(x.dtype).eps)
    return torch.clamp(torch.round(x / s), lo, hi) * s


def check_act_quant(model, fp, ids) -> dict:
    """Are input activations really fake-quantized in the forward of the frozen model?

    On one window: every Linear with ``input_activations`` in its scheme is hooked; its output
    must match ``linear(ref_per_token(x), W)`` (W: its on-grid weight) and not ``linear(x, W)``.
    Then the logits are compared with the float model's and with the same model with
    ``quantization_enabled = False`` (weight-only, the weights being already on their grid)."""
    import torch
    import torch.nn.functional as F

    rows: list = []

    def hook(name, bits):
        def h(mod, args, out):
            x = args[0].detach().float()
            w = mod.weight.detach().float()
            b = None if mod.bias is None else mod.bias.detach().float()
            y = out.detach().float()
            ya = F.linear(ref_per_token(x, bits), w, b)
            yw = F.linear(x, w, b)
            scale = y.abs().max().item() or 1.0
            rows.append((name, (y - ya).abs().max().item() / scale, (y - yw).abs().max().item() / scale))
        return h

    handles = []
    for name, m in model.named_modules():
        a = getattr(getattr(m, "quantization_scheme", None), "input_activations", None)
        if isinstance(m, torch.nn.Linear) and a is not None:
            if not (a.dynamic and str(a.strategy).lower().endswith("token") and a.symmetric):
                raise RuntimeError(f"{name}: input activations {a} are not dynamic per-token symmetric")
            handles.append(m.register_forward_hook(hook(name, a.num_bits)))
    if not handles:
        raise RuntimeError("no Linear has input_activations in its quantization scheme")
    try:
        with torch.no_grad():
            q_logits = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        f_logits = fp(input_ids=ids, use_cache=False).logits.float()
        mods = [m for m in model.modules() if hasattr(m, "quantization_scheme")]
        for m in mods:
            m.quantization_enabled = False
        try:
            w_logits = model(input_ids=ids, use_cache=False).logits.float()
        finally:
            for m in mods:
                m.quantization_enabled = True

    def rel(a, b):
        return (a - b).norm().item() / max(b.norm().item(), 1e-30)

    worst_a = max(r[1] for r in rows)
    least_w = min(r[2] for r in rows)
    out = {"linears": len(rows), "status": str(getattr(mods[0], "quantization_status", "?")),
           "max_rel_err_vs_ref_a8": worst_a, "min_rel_err_vs_weight_only": least_w,
           "logits_rel_diff_vs_float": rel(q_logits, f_logits),
           "logits_rel_diff_vs_quantizers_disabled": rel(q_logits, w_logits),
           "logits_rel_diff_disabled_vs_float": rel(w_logits, f_logits)}
    if worst_a > 1e-4 or least_w <= 10 * worst_a or out["logits_rel_diff_vs_quantizers_disabled"] == 0:
        raise RuntimeError(f"activations are not fake-quantized as expected: {out}")
    return out


def perplexity(model, windows, batch_size: int) -> float:
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in torch.split(windows, batch_size):
            logits = model(input_ids=b, use_cache=False).logits.float()
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                   reduction="sum").item()
            count += b[:, 1:].numel()
    return math.exp(nll / count)


def layer_sqnr(fp, q, windows, batch_size: int) -> list[float]:
    """Per decoder layer: 10 log10(sum y_f^2 / sum (y_q - y_f)^2), each model on its own inputs."""
    import torch

    def layers(m):
        return m.model.layers

    n = len(layers(fp))
    f2, e2 = [0.0] * n, [0.0] * n
    outs: dict = {}

    def hook(tag, i):
        def h(_mod, _args, out):
            outs[(tag, i)] = (out[0] if isinstance(out, tuple) else out).detach().float()
        return h

    handles = [layers(m)[i].register_forward_hook(hook(tag, i)) for tag, m in (("f", fp), ("q", q))
               for i in range(n)]
    try:
        with torch.no_grad():
            for b in torch.split(windows, batch_size):
                fp(input_ids=b, use_cache=False)
                q(input_ids=b, use_cache=False)
                for i in range(n):
                    yf, yq = outs[("f", i)], outs[("q", i)]
                    f2[i] += yf.double().square().sum().item()
                    e2[i] += (yq.double() - yf.double()).square().sum().item()
                outs.clear()
    finally:
        for h in handles:
            h.remove()
    return [10 * math.log10(a / b) if b > 0 else float("inf") for a, b in zip(f2, e2)]


def main() -> None:
    spec = json.loads(sys.argv[1])
    threads = int(spec.get("threads") or 0)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    res: dict = {"method": spec["method"], "bits": spec["bits"], "group": spec["group"]}
    try:
        import llmcompressor

        res["llmcompressor"] = getattr(llmcompressor, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    calib = torch.load(spec["calib"], weights_only=True).long()
    evalw = torch.load(spec["eval"], weights_only=True).long()
    diag = torch.load(spec["diag"], weights_only=True).long()
    bs = int(spec.get("batch_size", 8))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    res["load_s"] = time.perf_counter() - t0
    if spec["method"] == "fp":
        res["ppl"] = perplexity(model, evalw, bs)
        res["vmhwm_exit"] = vm_hwm()
        print("RESULT " + json.dumps(res), flush=True)
        return
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        from datasets import Dataset
        from llmcompressor import oneshot

        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        rec = recipe(spec["method"], spec["bits"], spec["group"], spec.get("extra") or {})
        t0 = time.perf_counter()
        oneshot(model=model, tokenizer=spec["model"], dataset=ds, recipe=rec, max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0], batch_size=int(spec.get("calib_batch_size", 1)),
                output_dir=None, log_dir=None)
        res["quant_s"] = time.perf_counter() - t0
        res["vmhwm_quant"] = vm_hwm()
        res["materialized"] = materialize(model)
        res["check"] = check_quantized(model, fp_state, spec["bits"] if spec["method"] != "smoothquant" else 8)
        if spec["method"] == "smoothquant":
            fp0 = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
            res["act_check"] = check_act_quant(model, fp0, diag[:1])
            del fp0
    except Exception as e:  # noqa: BLE001 - a failing method is a table cell, not a crash
        msg = " ".join(str(e).split()) or type(e).__name__
        res["error"] = f"{type(e).__name__}: {msg}"[:300]
        res["traceback"] = traceback.format_exc()[-3000:]
        res["vmhwm_exit"] = vm_hwm()
        print("RESULT " + json.dumps(res), flush=True)
        return
    del fp_state
    t0 = time.perf_counter()
    res["ppl"] = perplexity(model, evalw, bs)
    if spec.get("sqnr", True):
        fp = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
        sq = layer_sqnr(fp, model, diag, bs)
        res["sqnr_layers"] = sq
        res["sqnr_mean"] = sum(sq) / len(sq)
    res["eval_s"] = time.perf_counter() - t0
    res["vmhwm_exit"] = vm_hwm()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
