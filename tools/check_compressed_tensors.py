#!/usr/bin/env python
"""Cross-check ptqc's compressed-tensors format against the real library (llm-compressor /
compressed-tensors). Run with the python of a venv that has ``llmcompressor`` and
``compressed-tensors`` installed (not ptqc's: they pin other torch/transformers versions).

    # 1. our export loads in transformers + compressed-tensors and gives the artifact's logits
    #    (in ptqc's venv: save the artifact's logits on fixed ids next to the export)
    python tools/check_compressed_tensors.py logits-ptqc ART EXPORT      # ptqc venv: EXPORT/ptqc_logits.pt
                                                       # (ART may be EXPORT itself: ptqc's loader)
    LLMC_PY tools/check_compressed_tensors.py compare EXPORT             # llmc venv: prints the errors

    # 2. a real llm-compressor export, for tests/data (our loader and checker must accept it)
    LLMC_PY tools/check_compressed_tensors.py reference MODEL OUT --scheme W8A8

``compare`` loads EXPORT with ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors
decompresses the weights on load and fake-quantizes the activations the config describes), runs
the ids saved in ``ptqc_logits.pt`` and prints one JSON line: max |difference| of the logits,
relative error, and agreement of the argmax. ``reference`` quantizes MODEL with ``oneshot`` and
the ``QuantizationModifier`` preset ``--scheme`` (calibrated on random token ids: only the
format matters) and saves it compressed to OUT with the logits of the quantized model on fixed
ids (``llmc_logits.pt``: what transformers computes with the saved model).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

IDS_SEED = 1234


def fixed_ids(vocab: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(IDS_SEED)
    return torch.randint(0, min(vocab, 300), (batch, seq), generator=g)


def _hf_logits(path, ids, dtype="float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float(), model


def logits_ptqc(args) -> None:
    """(ptqc venv) the artifact's logits on the fixed ids, saved as EXPORT/ptqc_logits.pt."""
    from ptqc import artifact
    from ptqc.lowering import compressed_tensors as ct

    qm = ct.load(args.artifact, args.dtype) if ct.is_export(args.artifact) else artifact.load_any(args.artifact)
    ids = fixed_ids(qm.config.vocab_size)
    with torch.no_grad():
        y = qm(ids).float()
    out = Path(args.export) / "ptqc_logits.pt"
    torch.save({"ids": ids, "logits": y}, out)
    print(json.dumps({"saved": str(out), "shape": list(y.shape)}))


def compare(args) -> None:
    """(llmc venv) load EXPORT with transformers + compressed-tensors, compare with ptqc's logits."""
    if args.qmax127:
        _dynamic_scale_qmax()
    ref = torch.load(Path(args.export) / (args.logits or "ptqc_logits.pt"))
    y, model = _hf_logits(args.export, ref["ids"], args.dtype)
    x = ref["logits"]
    diff = (y - x).abs()
    schemes = [m.quantization_scheme for m in model.modules() if getattr(m, "quantization_scheme", None)]
    fmt = json.loads((Path(args.export) / "config.json").read_text()).get("quantization_config", {}).get("format")
    res = {"export": str(args.export), "format": fmt, "quantized_modules": len(schemes),
           "dynamic_scale": "amax/qmax (patched)" if args.qmax127 else "compressed-tensors' amax/((qmax-qmin)/2)",
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "rel_err": float((y - x).norm() / x.norm()),
           "argmax_agree": float((y.argmax(-1) == x.argmax(-1)).float().mean()),
           "logit_absmax": float(x.abs().max())}
    print(json.dumps(res))
    if args.atol is not None and res["max_abs_diff"] > args.atol:
        sys.exit(1)


def _dynamic_scale_qmax() -> None:
    """Make compressed-tensors' dynamic symmetric int scales amax / qmax (ptqc's, the
    Ascend npu_dynamic_quant rule) instead of its amax / ((qmax - qmin) / 2), to isolate that one known difference."""
    from compressed_tensors.quantization.lifecycle import forward

    orig = forward.compute_dynamic_scales_and_zp

    def patched(value, args, module, global_scale=None):
        scale, zp = orig(value=value, args=args, module=module, global_scale=global_scale)
        if args.symmetric and args.type == "int":
            b = args.num_bits
            scale = scale * (((1 << b) - 1) / 2) / ((1 << (b - 1)) - 1)
        return scale, zp

    forward.compute_dynamic_scales_and_zp = patched


SCHEMES = {  # name -> QuantizationModifier kwargs
    "W8A8": {"scheme": "W8A8"},
    "W4A16": {"scheme": "W4A16"},
    "W4A16_ASYM": {"scheme": "W4A16_ASYM"},
    "W8A16": {"scheme": "W8A16"},
    "W8A8_STATIC": {"scheme": "W8A8", "static": True},  # per-tensor static input scales
}


def reference(args) -> None:
    """(llmc venv) a real llm-compressor export of MODEL with a preset scheme."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 300), (args.samples, args.seqlen), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kw = dict(SCHEMES[args.scheme])
    static = kw.pop("static", False)
    if args.group_size or static:
        from compressed_tensors.quantization import QuantizationScheme
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        base = preset_name_to_scheme(kw.pop("scheme"), ["Linear"])
        w = base.weights.model_copy(update={"group_size": args.group_size} if args.group_size else {})
        a = base.input_activations
        if static:
            a = a.model_copy(update={"strategy": "tensor", "dynamic": False, "observer": "minmax"})
        kw["config_groups"] = {"group_0": QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)}
    recipe = QuantizationModifier(targets="Linear", ignore=["lm_head"], **kw)
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=args.samples,
            max_seq_length=args.seqlen, pipeline="basic")
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    y, _ = _hf_logits(args.out, fixed_ids(model.config.vocab_size))
    torch.save({"ids": fixed_ids(model.config.vocab_size), "logits": y}, Path(args.out) / "llmc_logits.pt")
    print(json.dumps({"out": args.out, "files": sorted(p.name for p in Path(args.out).iterdir())}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("logits-ptqc", help="(ptqc venv) save the artifact's logits next to its export")
    p.add_argument("artifact", help="a ptqc artifact, or a compressed-tensors export (read by ptqc's loader)")
    p.add_argument("export")
    p.add_argument("--dtype", default="float32", help="for an export: the dtype ptqc's loader uses")
    p.set_defaults(fn=logits_ptqc)
    p = sub.add_parser("compare", help="(llmc venv) load the export with transformers, compare logits")
    p.add_argument("export")
    p.add_argument("--logits", default=None, help="file in EXPORT with ids + logits (default ptqc_logits.pt)")
    p.add_argument("--atol", type=float, default=None, help="exit 1 above this max |difference|")
    p.add_argument("--dtype", default="float32", help="torch dtype transformers runs the model in (the artifact's)")
    p.add_argument("--qmax127", action="store_true",
                   help="patch compressed-tensors' dynamic int scale to amax/qmax (ptqc's convention)")
    p.set_defaults(fn=compare)
    p = sub.add_parser("reference", help="(llmc venv) a real llm-compressor export of MODEL")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--scheme", default="W8A8", choices=sorted(SCHEMES))
    p.add_argument("--group-size", type=int, default=0, help="override the preset's weight group size")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=32)
    p.set_defaults(fn=reference)
    a = ap.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
