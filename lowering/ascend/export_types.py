"""The Ascend export types W8A8_MIX, W4A4_DYNAMIC, W4A4_FLATQUANT_DYNAMIC, W8A8_MXFP8 and W4A4_MXFP4
(vllm-ascend 0.23.0's schemes of those names): which linears are of them, their tensors, and the
checker's rules for them (the other types: :mod:`export`, :mod:`export_check`).

    W8A8_MIX                int8 weights + activations dynamic per token at prefill, static per tensor
                            at decode (``w8a8_mix``): W8A8's tensors (.weight, .input_scale, .input_offset,
                            .deq_scale, .quant_bias, .weight_scale, .weight_offset)
    W4A4_DYNAMIC            int4 symmetric per-channel weights + int4 dynamic per-token activations
                            (``w4a4``): .weight int8 [out, in] (one code per byte, vllm-ascend packs
                            it), .weight_scale / .weight_offset float32 [out, 1]
    W4A4_FLATQUANT_DYNAMIC  the same after a FlatQuant transform ``x (a kron b)`` (``flatquant``):
                            + .left_trans [M, M] = a and .right_trans [N, N] = b in the serving
                            dtype, (M, N) vllm-ascend's get_decompose_dim(in) (= ptqc's kron_dims; the
                            o_proj transform O kron I_d is written as (O kron I_{M/heads}) kron I_N),
                            .clip_ratio float32 [1] (the activation clip); the kernel computes
                            ``left^T X right`` per token, ptqc's transform
    W8A8_MXFP8              MXFP8 (``w8a8_mxfp8``): .weight float8_e4m3fn [out, in], .weight_scale
                            uint8 [out, in / 32] (E8M0: exponent + 127)
    W4A4_MXFP4              MXFP4 (``w4a4_mxfp4``): .weight uint8 [out, in / 2] (two E2M1 nibbles per
                            byte, low first: quant.pack_fp4), .weight_scale uint8 [out, in / 32]
"""
from __future__ import annotations

import math

import torch

from ptqc import ops, quant
from ptqc.errors import PtqcError
from ptqc.ir import QModel, info, is_op
from ptqc.lowering import checkpoint

MX_TYPES = {8: "W8A8_MXFP8", 4: "W4A4_MXFP4"}
FLATQUANT = "W4A4_FLATQUANT_DYNAMIC"
TYPES = ("W8A8_MIX", "W4A4_DYNAMIC", FLATQUANT, *MX_TYPES.values())
# type -> suffix -> (safetensors dtypes, shapes from the geometry g = {o: out, k: in, m, n}, what is expected)
RULES = {
    FLATQUANT: {"weight": (("I8",), lambda g: ((g["o"], g["k"]),), "int8 [{o}, {k}]"),
                "weight_scale": (("F32",), lambda g: ((g["o"], 1),), "float32 [{o}, 1]"),
                "weight_offset": (("F32",), lambda g: ((g["o"], 1),), "float32 [{o}, 1]"),
                "left_trans": (("F16", "BF16", "F32"), lambda g: ((g["m"], g["m"]),), "float [{m}, {m}]"),
                "right_trans": (("F16", "BF16", "F32"), lambda g: ((g["n"], g["n"]),), "float [{n}, {n}]"),
                "clip_ratio": (("F32",), lambda g: ((1,),), "float32 [1]")},
    "W8A8_MXFP8": {"weight": (("F8_E4M3",), lambda g: ((g["o"], g["k"]),), "float8_e4m3fn [{o}, {k}]"),
                   "weight_scale": (("U8",), lambda g: ((g["o"], -(-g["k"] // quant.MX_BLOCK)),),
                                    "uint8 (E8M0) [{o}, in / 32]")},
    "W4A4_MXFP4": {"weight": (("U8",), lambda g: ((g["o"], g["k"] // 2),), "uint8 (two FP4 E2M1 per byte) [{o}, in / 2]"),
                   "weight_scale": (("U8",), lambda g: ((g["o"], g["k"] // quant.MX_BLOCK),),
                                    "uint8 (E8M0) [{o}, in / 32]")},
}


def decompose_dim(n: int) -> tuple[int, int]:
    """vllm-ascend's get_decompose_dim: n = (a - b)(a + b) with a the smallest such a >= sqrt(n)."""
    a = math.isqrt(n)
    a += a * a < n
    while math.isqrt(a * a - n) ** 2 != a * a - n:
        a += 1
    b = math.isqrt(a * a - n)
    return a - b, a + b


def _act_kind(a) -> str:
    return a.args[7] if len(a.args) > 7 else "int"


def classify(lin, wq: dict, a) -> str | None:
    """The new export type of a quantized linear whose input is ``a``, or None (an older type)."""
    mod = info(lin)["module"]
    if wq.get("kind") == "mx" or (is_op(a, ops.QUANTIZE_ACT) and _act_kind(a) == "mx"):
        if not is_op(a, ops.QUANTIZE_ACT) or _act_kind(a) != "mx" or wq.get("kind") != "mx" \
                or a.args[3] != wq["bits"]:
            raise PtqcError(f"{mod}: vllm-ascend serves MX as W8A8_MXFP8 or W4A4_MXFP4 (MX weights and MX "
                            "activations of the same element type); compile w8a8_mxfp8 or w4a4_mxfp4")
        return MX_TYPES[wq["bits"]]
    if not is_op(a, ops.QUANTIZE_ACT):
        return None
    if _act_kind(a) == "mix":
        return "W8A8_MIX"
    if a.args[3] != 4:
        return None
    if wq["bits"] != 4 or wq["group"] != 0 or not wq["sym"] or a.args[1] is not None or a.args[4] != 0 \
            or not a.args[5]:
        raise PtqcError(f"{mod}: W4A4 exports as W4A4_DYNAMIC / W4A4_FLATQUANT_DYNAMIC: int4 symmetric per-channel "
                        "weights and int4 dynamic symmetric per-token activations (w4a4, flatquant)")
    if is_op(a.args[0], ops.TRANSFORM):
        return FLATQUANT
    clip = a.args[6] if len(a.args) > 6 else 1.0
    if clip != 1.0:
        raise PtqcError(f"{mod}: W4A4_DYNAMIC has no activation clip ratio (npu_dynamic_quant); found {clip:.4g}")
    return "W4A4_DYNAMIC"


def _flatquant(qm: QModel, lin, base: str, serving: torch.dtype) -> tuple[dict, set]:
    """left_trans, right_trans and clip_ratio of a W4A4_FLATQUANT_DYNAMIC linear."""
    q = lin.args[0]
    t = q.args[0]
    a = qm.store[t.args[1].target].float()
    b = qm.store[t.args[2].target].float() if len(t.args) > 2 and t.args[2] is not None else None
    k = a.shape[0] * (b.shape[0] if b is not None else 1)
    m, n = decompose_dim(k)
    if b is None or (a.shape[0], b.shape[0]) != (m, n):
        a, b = _refactor(base, a, b, m, n)
    clip = float(q.args[6]) if len(q.args) > 6 else 1.0
    return ({"left_trans": a.to(serving), "right_trans": b.to(serving), "clip_ratio": torch.tensor([clip])},
            checkpoint.store_inputs(t))


def _refactor(base: str, a: torch.Tensor, b: torch.Tensor | None, m: int, n: int) -> tuple:
    """``a kron b`` as ``a' kron b'`` with factors (m, n) when b is an identity (or absent) and a's size
    divides m: a' = a kron I_{m / |a|}, b' = I_n; else the reason it cannot be."""
    p = a.shape[0]
    eye = b is None or torch.equal(b, torch.eye(b.shape[0]))
    if not eye or m % p:
        raise PtqcError(f"{base}: its FlatQuant transform is {p} x {'?' if b is None else b.shape[0]}, but "
                        f"vllm-ascend's W4A4_FLATQUANT_DYNAMIC takes Kronecker factors {m} x {n} "
                        "(get_decompose_dim of the input size)")
    return torch.kron(a, torch.eye(m // p)), torch.eye(n)


def _mx(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> dict:
    w = codes.to(torch.float8_e4m3fn) if bits == 8 else quant.pack_fp4(codes.float())
    return {"weight": w, "weight_scale": quant.mx_exponent(scale)}


def tensors(qm: QModel, lin, kind: str, serving: torch.dtype) -> tuple[dict, set] | None:
    """(tensors of a linear of a new type by suffix, the store names they replace), or None (older type)."""
    if kind not in TYPES or kind == "W8A8_MIX":
        return None
    dq = lin.args[1]
    codes = checkpoint.weight_codes(qm, dq)
    scale = qm.store[dq.args[1].target].float()
    handled = checkpoint.store_inputs(dq, dq.args[0])
    if kind in MX_TYPES.values():
        return _mx(codes, scale, 8 if kind == "W8A8_MXFP8" else 4), handled
    base = info(lin)["module"]
    t = {"weight": codes.to(torch.int8), "weight_scale": scale.reshape(-1, 1),
         "weight_offset": torch.zeros(scale.shape[0], 1)}
    if kind == FLATQUANT:
        extra, done = _flatquant(qm, lin, base, serving)
        return t | extra, handled | done
    return t, handled


def check_transforms(qm: QModel) -> None:
    """Refuse transforms vllm-ascend cannot run: FlatQuant's online Q/K transform (k_transform)."""
    for n in qm.nodes(ops.TRANSFORM):
        kind = info(n).get("transform", {}).get("kind", "")
        if kind.startswith("k_cache"):
            raise PtqcError(f"{info(n)['module']}: FlatQuant's online Q/K transform has no place in vllm-ascend "
                            "(W4A4_FLATQUANT_DYNAMIC transforms linear inputs only); compile flatquant:k_transform=false")
        if not any(is_op(u, ops.QUANTIZE_ACT) for u in n.users):
            raise PtqcError(f"{info(n)['module']}: a float online transform has no Ascend export type "
                            "(vllm-ascend runs transforms only inside W4A4_FLATQUANT_DYNAMIC)")


def geometry(kind: str, weight: str, shape) -> tuple[dict, list[str]]:
    """(the geometry {o, k, m, n} of a FlatQuant or MX linear from its weight's shape, problems of that shape)."""
    o, k = shape[0], shape[-1] * (2 if kind == "W4A4_MXFP4" else 1)
    m, n = decompose_dim(k) if kind == FLATQUANT else (0, 0)
    bad = [f"{weight}: {kind} needs the input dimension ({k}) to be a multiple of {quant.MX_BLOCK}"] \
        if kind != FLATQUANT and k % quant.MX_BLOCK else []
    return {"o": o, "k": k, "m": m, "n": n}, bad


def read(qm: QModel, base: str, kind: str) -> tuple | None:
    """(weight QuantSpec, codes, scale, zero point, activation key) of an exported linear of a new type
    (for :func:`export_load.load`), or None (an older type)."""
    if kind not in TYPES:
        return None
    if kind == FLATQUANT:
        raise PtqcError(f"{base}: reading back {FLATQUANT} (its transforms) is not supported; evaluate the artifact")
    w, scale = qm.store[f"{base}.weight"], qm.store[f"{base}.weight_scale"]
    if kind in MX_TYPES.values():
        bits = 8 if kind == "W8A8_MXFP8" else 4
        codes = w.to(torch.float8_e4m3fn) if bits == 8 else quant.unpack_fp4(w).to(torch.float8_e4m3fn)
        return quant.QuantSpec(bits, quant.MX_BLOCK, True, kind="mx"), codes, quant.mx_scale_of(scale), None, kind
    bits = 4 if kind == "W4A4_DYNAMIC" else 8
    return quant.QuantSpec(bits, 0, True), w.to(torch.int8), scale.float().reshape(-1, 1), None, kind


def insert_act(qm: QModel, src, lins: list, kind: str) -> bool:
    """The activation quantizer of exported linears of a new type on ``src``; False for an older type."""
    from ptqc.passes.act_quant import insert_quantizer

    if kind not in TYPES:
        return False
    if kind == "W8A8_MIX":
        base = info(lins[0])["module"]
        s, off = qm.store[f"{base}.input_scale"].float().reshape(1), qm.store[f"{base}.input_offset"].float()
        if off.any():
            raise PtqcError(f"{base}: W8A8_MIX with an input_offset is not read back (ptqc's mix is symmetric)")
        insert_quantizer(qm, src, lins, quant.QuantSpec(8, 0, True, kind="mix"), scale=s, method="static-export")
    elif kind == "W4A4_DYNAMIC":
        insert_quantizer(qm, src, lins, quant.QuantSpec(4, 0, True))
    else:
        insert_quantizer(qm, src, lins, quant.QuantSpec(8 if kind == "W8A8_MXFP8" else 4, quant.MX_BLOCK, True,
                                                        kind="mx"))
    return True
