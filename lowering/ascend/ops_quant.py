"""Quantization kernels: int8 (npu_dynamic_quant, npu_quantize, W8A8_MIX's pair of them,
npu_trans_quant_param) and int4
(packing, npu_dynamic_quant to int4, npu_kronecker_quant, npu_rotate_quant), with the helpers
every ptqc_npu op shares (the NPU dispatch, saturating rounding). See ops.py."""
from __future__ import annotations

from typing import Optional

import torch

from ptqc.errors import PtqcError


def _npu(x: torch.Tensor) -> bool:
    return x.device.type == "npu"


def _torch_npu():
    import torch_npu  # noqa: F401 - only on an Ascend machine

    return torch_npu


def _require(why: str | None) -> None:
    """Raise the reason a kernel cannot take its inputs (a ``check_*`` result), if any."""
    if why:
        raise PtqcError(why)


def _saturate_round(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(v), -128, 127).to(torch.int8)


def _per_token(h: torch.Tensor, qmax: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric codes of float32 ``h`` [..., n]: scale = rowmax|h| * clip / qmax, codes =
    round half-even(h / scale) saturated to [-qmax - 1, qmax] (clip < 1 makes the saturation bite)."""
    scale = h.abs().amax(-1) * clip / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(h / safe.unsqueeze(-1)), -qmax - 1, qmax), scale


# ---- activation quantization ------------------------------------------------------------------
@torch.library.custom_op("ptqc_npu::dynamic_quant", mutates_args=())
def dynamic_quant(x: torch.Tensor, smooth_scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant: per-token symmetric int8. Returns (codes int8, scale float32 x.shape[:-1])."""
    if _npu(x):
        return _torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales)
    codes, scale = _per_token(x.float() if smooth_scales is None else x.float() * smooth_scales.float(), 127)
    return codes.to(torch.int8), scale


@dynamic_quant.register_fake
def _(x, smooth_scales=None):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ptqc_npu::quantize", mutates_args=())
def quantize(x: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor] = None,
             div_mode: bool = True) -> torch.Tensor:
    """npu_quantize to int8: ``round(x / scales + zero_points)`` saturated (scales broadcast on the last dim)."""
    if _npu(x):
        return _torch_npu().npu_quantize(x, scales, zero_points, torch.qint8, -1, div_mode)
    v = x.float() / scales.float() if div_mode else x.float() * scales.float()
    if zero_points is not None:
        v = v + zero_points.float()
    return _saturate_round(v)


@quantize.register_fake
def _(x, scales, zero_points=None, div_mode=True):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


@torch.library.custom_op("ptqc_npu::pd_mix_quant", mutates_args=())
def pd_mix_quant(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vllm-ascend W8A8_MIX's activation quantization: more than one token per sequence (prefill) is
    npu_dynamic_quant; one token (decode, where the KV-consumer node runs the static scheme) is
    npu_quantize with the calibrated symmetric ``input_scale``, which is then every token's scale.
    Returns (codes int8, scale float32 x.shape[:-1]) for the per-token quant_matmul. Chosen: decode
    goes through that matmul (weight_scale x input_scale in float32) rather than the static scheme's
    deq_scale / quant_bias (the same products, rounded once more)."""
    if x.dim() >= 2 and x.shape[-2] == 1:
        return quantize(x, input_scale.reshape(1)), input_scale.float().reshape(1).expand(x.shape[:-1]).clone()
    return dynamic_quant(x)


@pd_mix_quant.register_fake
def _(x, input_scale):
    return torch.empty(x.shape, dtype=torch.int8, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)


PD_MIX_QUANT = torch.ops.ptqc_npu.pd_mix_quant.default


# ---- scale conversion -------------------------------------------------------------------------
@torch.library.custom_op("ptqc_npu::trans_quant_param", mutates_args=())
def trans_quant_param(scale: torch.Tensor, round_mode: int = 0) -> torch.Tensor:
    """npu_trans_quant_param: float32 dequant scale -> int64 with only the top 19 float bits kept
    (round_mode 0 truncates, 1 rounds to nearest). The offset form is not emulated."""
    if _npu(scale):
        return _torch_npu().npu_trans_quant_param(scale, None, round_mode)
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if round_mode == 1:
        bits = torch.minimum(bits + 0x1000, torch.full_like(bits, 0xFFFFFFFF))
    return (bits & 0xFFFFE000) | (1 << 46)


@trans_quant_param.register_fake
def _(scale, round_mode=0):
    return scale.new_empty(scale.shape, dtype=torch.int64)


def deq_scale_value(q: torch.Tensor) -> torch.Tensor:
    """The float32 scale an int64 ``npu_trans_quant_param`` result stands for."""
    low = (q & 0xFFFFFFFF).to(torch.int64)
    low = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)
    return low.view(torch.float32)


def truncate19(scale: torch.Tensor) -> torch.Tensor:
    """A float32 scale as the NPU sees it after npu_trans_quant_param (round_mode 0)."""
    return deq_scale_value(trans_quant_param(scale.float()))


# ---- int4 (W4A4): packing, per-token int4 quantization, Kronecker/rotation transforms + quant ----
# Packing order (the torch_npu docs only say "8 int4 per int32, interleaved"): element j of each
# group of 8 along the last dim sits in bits [4j, 4j + 4) of the int32, two's complement, i.e.
# low nibble first -- the msModelSlim W4A16 byte layout (pack_int4) read as little-endian int32,
# which is how vllm-ascend's modelslim path builds int32 int4 weights (int8 pairs .view(int32)).
MAX_KRONECKER_TOKENS = 32768  # npu_kronecker_quant dim 0 limit (vllm-ascend splits larger batches)
ROTATE_QUANT_K = (16, 1024)  # npu_rotate_quant (A2/A3): rotation [K, K], K in [16, 1024]
ROTATE_QUANT_N = (128, 16000)  # ... x 2-D, last dim in [128, 16000], divisible by 8 and by K


def pack_int4x8(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (any int dtype, values in [-8, 7]) -> int32, 8 per element along the last
    dim, element j in bits [4j, 4j + 4)."""
    if codes.shape[-1] % 8:
        raise PtqcError(f"cannot pack {codes.shape[-1]} int4 codes 8 per int32: the last dimension must be a multiple of 8")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8) & 0xF
    word = (c << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int4x8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4x8`: int8 codes in [-8, 7], last dim x 8 (sign-extended nibbles)."""
    w = packed.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, device=packed.device))
    nib = w & 0xF
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _int4_codes(h: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int4 of float32 ``h`` (:func:`_per_token`, qmax 7), packed 8 per int32."""
    codes, scale = _per_token(h, 7, clip)
    return pack_int4x8(codes), scale


def _int4_fake(x, *args, **kwargs):
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 8), dtype=torch.int32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("ptqc_npu::convert_weight_to_int4pack", mutates_args=())
def convert_weight_to_int4pack(weight: torch.Tensor) -> torch.Tensor:
    """npu_convert_weight_to_int4pack: int32 codes [r, c] in [-8, 7] -> int32 [r, c / 8] (order above).
    An (n, k) weight packed along k and passed transposed is x2 = (k / 8, n) for quant_matmul."""
    if _npu(weight):
        return _torch_npu().npu_convert_weight_to_int4pack(weight.to(torch.int32))
    if weight.numel() and (weight.min() < -8 or weight.max() > 7):
        raise PtqcError("npu_convert_weight_to_int4pack takes values in [-8, 7]")
    return pack_int4x8(weight)


@convert_weight_to_int4pack.register_fake
def _(weight):
    return weight.new_empty((*weight.shape[:-1], weight.shape[-1] // 8), dtype=torch.int32)


def check_int4_last_dim(n: int, what: str = "npu_dynamic_quant (int4)") -> str | None:
    if n % 8:
        return f"{what} needs the last dimension to be a multiple of 8 (int4 packed 8 per int32; got {n})"
    return None


@torch.library.custom_op("ptqc_npu::dynamic_quant_int4", mutates_args=())
def dynamic_quant_int4(x: torch.Tensor, smooth_scales: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dynamic_quant(dst_type=torch.quint4x2): per-token symmetric int4, ``scale = rowmax|x *
    smooth| / 7`` (DTYPE_MAX of int4), ``y = round(x * smooth / scale)``. Returns (codes int32
    [..., k / 8] packed 8 per int32, scale float32 x.shape[:-1]). Doc silent, chosen: float32
    arithmetic, half-to-even rounding and saturation to [-8, 7] as the int8 path."""
    if _npu(x):
        return _torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales, dst_type=torch.quint4x2)
    _require(check_int4_last_dim(x.shape[-1]))
    return _int4_codes(x.float() if smooth_scales is None else x.float() * smooth_scales.float())


dynamic_quant_int4.register_fake(_int4_fake)


def check_kronecker_quant(m: int, n: int) -> str | None:
    if n % 8:
        return f"npu_kronecker_quant needs the right factor's size N to be a multiple of 8 (got M={m}, N={n})"
    return None


@torch.library.custom_op("ptqc_npu::kronecker_quant", mutates_args=())
def kronecker_quant(x: torch.Tensor, kronecker_p1: torch.Tensor, kronecker_p2: torch.Tensor,
                    clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_kronecker_quant(dst_dtype=int32): two small matmuls, then per-token int4 quantization.

    The kernel takes x [K, M, N] (K tokens), p1 [M, M], p2 [N, N]; here x is [..., M * N] and is
    viewed as [tokens, M, N] (outputs reshaped back): returns (codes int32 [..., M * N / 8],
    quant_scale float32 [...]). The docs give no formula; chosen, following FlatQuant and
    vllm-ascend's W4A4_FLATQUANT_DYNAMIC (which passes ``left_trans.t()`` as p1):
    ``y_k = p1 @ x_k @ p2`` (so row-major ``vec(y_k) = vec(x_k) (p1^T kron p2)``; ptqc's
    ``transform(x, a, b) = x (a kron b)`` is p1 = a^T, p2 = b), float32 with (p1 @ x) @ p2 order,
    then ``scale = rowmax|y| * clip_ratio / 7``, ``round_half_even(y / scale)`` saturated to
    [-8, 7], packed as above. On an NPU more than 32768 tokens are split (kernel limit)."""
    m, n = kronecker_p1.shape[0], kronecker_p2.shape[0]
    lead = x.shape[:-1]
    if _npu(x):
        x3 = x.reshape(-1, m, n)
        parts = [_torch_npu().npu_kronecker_quant(c, kronecker_p1, kronecker_p2, clip_ratio=clip_ratio,
                                                  dst_dtype=torch.int32)
                 for c in torch.split(x3, MAX_KRONECKER_TOKENS, 0)]
        codes = torch.cat([p[0] for p in parts]).reshape(*lead, m * n // 8)
        return codes, torch.cat([p[1].reshape(-1) for p in parts]).reshape(lead)
    _require(check_kronecker_quant(m, n))
    if x.shape[-1] != m * n:
        raise PtqcError(f"npu_kronecker_quant: last dim {x.shape[-1]} != M * N = {m} * {n}")
    h = x.float().reshape(*lead, m, n)
    y = (kronecker_p1.float() @ h) @ kronecker_p2.float()
    return _int4_codes(y.reshape(*lead, m * n), clip_ratio)


kronecker_quant.register_fake(_int4_fake)


def check_rotate_quant(k: int, n: int) -> str | None:
    lo, hi = ROTATE_QUANT_K
    if not lo <= k <= hi:
        return f"npu_rotate_quant takes a rotation [K, K] with K in [{lo}, {hi}] (got K={k})"
    lo, hi = ROTATE_QUANT_N
    if not lo <= n <= hi or n % 8 or n % k:
        return (f"npu_rotate_quant needs the last dim in [{lo}, {hi}], divisible by 8 and by K "
                f"(got {n}, K={k})")
    return None


@torch.library.custom_op("ptqc_npu::rotate_quant", mutates_args=())
def rotate_quant(x: torch.Tensor, rotation: torch.Tensor, int4: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_rotate_quant (A2/A3: dst_dtype int8 or quint4x2, scale_alg 0, alpha None): every block of
    K along the last dim is multiplied by rotation [K, K] (``x (I kron R)``; the 950 variant takes
    one rotation per block, which pins down the block reading), then per-token symmetric dynamic
    quantization as npu_dynamic_quant. x is [..., N] (the kernel takes 2-D [M, N]; viewed so).
    Returns (codes: int32 [..., N / 8] when ``int4`` else int8 [..., N], scale float32 [...]).
    Chosen where the docs are silent: float32 arithmetic, round half to even ("rint"), saturation."""
    k, n = rotation.shape[0], x.shape[-1]
    lead = x.shape[:-1]
    if _npu(x):
        y, s = _torch_npu().npu_rotate_quant(x.reshape(-1, n), rotation,
                                             dst_dtype=torch.quint4x2 if int4 else torch.int8)
        return y.reshape(*lead, y.shape[-1]), s.reshape(lead)
    _require(check_rotate_quant(k, n))
    h = (x.float().reshape(*lead, n // k, k) @ rotation.float()).reshape(*lead, n)
    if int4:
        return _int4_codes(h)
    return dynamic_quant(h)


@rotate_quant.register_fake
def _(x, rotation, int4=True):
    return _int4_fake(x) if int4 else (x.new_empty(x.shape, dtype=torch.int8),
                                       x.new_empty(x.shape[:-1], dtype=torch.float32))
