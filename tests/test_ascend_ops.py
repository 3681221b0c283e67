"""Ascend op emulation against the documented formulas (torch_npu docs): saturation, rounding
ties, int32 accumulation, the 19-bit scale truncation, shape refusals; no torch_npu import."""
import os
import subprocess
import sys

import pytest
import torch

from ptqc import quant
from ptqc.errors import PtqcError
from ptqc.lowering.ascend import ops as npu


def test_dynamic_quant_is_per_token_rowmax_over_127_and_matches_the_shared_quantizer():
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3).to(torch.float16)
    codes, scale = npu.dynamic_quant(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 5)
    assert torch.equal(scale, x.float().abs().amax(-1) / 127)
    assert torch.equal(codes, torch.round(x.float() / scale[..., None]).to(torch.int8))
    assert int(codes.abs().amax(-1).min()) == 127  # the largest element of each row maps to +-127
    s, _ = quant.compute_qparams(x.float(), quant.QuantSpec(8, 0, True))
    assert torch.equal(codes, quant.quantize(x.float(), s, None, quant.QuantSpec(8, 0, True)))  # same numbers as fake-quant


def test_dynamic_quant_with_smooth_scales_multiplies_first():
    x = torch.randn(4, 32)
    sm = torch.rand(32) + 0.5
    codes, scale = npu.dynamic_quant(x, sm)
    ref_c, ref_s = npu.dynamic_quant(x * sm)
    assert torch.equal(codes, ref_c) and torch.equal(scale, ref_s)


def test_quantize_divides_adds_offset_before_rounding_ties_to_even_and_saturates():
    s = torch.tensor([0.5])
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, 100.0, -100.0])  # x / s = 0.5, 1.5, 2.5, -0.5, 200, -200
    assert npu.quantize(x, s).tolist() == [0, 2, 2, 0, 127, -128]
    # offset added before rounding: round(0.5 + 1) = 2 (even), not round(0.5) + 1 = 1
    assert npu.quantize(torch.tensor([0.25]), s, torch.tensor([1])).tolist() == [2]
    assert npu.quantize(torch.tensor([3.0]), torch.tensor([2.0]), div_mode=False).tolist() == [6]


def test_trans_quant_param_keeps_the_top_19_bits():
    s = torch.tensor([1.0 + 2 ** -10 + 2 ** -11 + 2 ** -20, 3.1e-4, 0.0123456789])
    q = npu.trans_quant_param(s)
    assert q.dtype == torch.int64 and bool(((q >> 46) & 1).all())
    bits = s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(q & 0xFFFFFFFF, bits & 0xFFFFE000)
    back = npu.deq_scale_value(q)
    assert back[0].item() == 1.0 + 2 ** -10  # 10 mantissa bits survive, 2^-11 and below are cut
    assert torch.all(back <= s) and torch.all((s - back) / s < 2 ** -10)
    up = npu.deq_scale_value(npu.trans_quant_param(torch.tensor([1.0 + 2 ** -11 + 2 ** -12]), round_mode=1))
    assert up.item() == 1.0 + 2 ** -10  # round_mode 1 rounds to nearest


def test_quant_matmul_int32_accumulation_per_token_and_bias_order():
    torch.manual_seed(1)
    x1 = torch.randint(-128, 128, (2, 7, 256), dtype=torch.int8)
    x2 = torch.randint(-128, 128, (256, 48), dtype=torch.int8)
    acc = npu.quant_matmul(x1, x2, torch.ones(1), output_dtype=torch.int32)
    ref = (x1.long() @ x2.long())
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), ref)
    ws, ts = torch.rand(48) / 100, torch.rand(2, 7) / 100
    bias = torch.randn(48)
    out = npu.quant_matmul(x1, x2, ws, pertoken_scale=ts.reshape(-1), bias=bias, output_dtype=torch.float32)
    assert torch.equal(out, ref.float() * ws * ts[..., None] + bias)
    ib = torch.randint(-1000, 1000, (48,), dtype=torch.int32)  # int32 bias: into the accumulator
    out = npu.quant_matmul(x1, x2, ws, bias=ib, output_dtype=torch.float32)
    assert torch.equal(out, (ref + ib).float() * ws)
    out16 = npu.quant_matmul(x1, x2, ws, pertoken_scale=ts.reshape(-1), output_dtype=torch.float16)
    assert out16.dtype == torch.float16 and torch.equal(out16, (ref.float() * ws * ts[..., None]).half())
    i8 = npu.quant_matmul(x1, x2, torch.tensor([1.0]))  # int8 output saturates
    assert i8.dtype == torch.int8 and int(i8.max()) == 127 and int(i8.min()) == -128


def test_quant_matmul_reads_an_int64_scale_truncated():
    x1 = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    x2 = torch.randint(-128, 128, (64, 8), dtype=torch.int8)
    s = torch.rand(8) / 1000 + 1e-5
    a = npu.quant_matmul(x1, x2, npu.trans_quant_param(s), output_dtype=torch.float32)
    b = npu.quant_matmul(x1, x2, npu.truncate19(s), output_dtype=torch.float32)
    c = npu.quant_matmul(x1, x2, s, output_dtype=torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_quant_matmul_refuses_k_over_65535():
    with pytest.raises(PtqcError, match="K and N up to 65535"):
        npu.quant_matmul(torch.zeros(1, 65536, dtype=torch.int8), torch.zeros(65536, 1, dtype=torch.int8),
                         torch.ones(1))


def test_weight_quant_batchmatmul_adds_the_offset_and_groups_along_k():
    torch.manual_seed(2)
    x = torch.randn(3, 64).to(torch.bfloat16)
    w = torch.randint(-8, 8, (64, 16), dtype=torch.int8)
    s = torch.rand(2, 16) / 10
    zp = torch.randint(-3, 3, (2, 16))
    y = npu.weight_quant_batchmatmul(x, w, s.to(torch.bfloat16), (-zp).to(torch.bfloat16), None, 32)
    deq = ((w.float() - zp.repeat_interleave(32, 0)) * s.to(torch.bfloat16).float().repeat_interleave(32, 0))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (x.float() @ deq.to(torch.bfloat16).float()).to(torch.bfloat16))
    with pytest.raises(PtqcError, match="multiples of 32"):
        npu.weight_quant_batchmatmul(x, w, s, None, None, 48)


def test_fused_add_norm_quant_equals_its_parts_in_float32():
    torch.manual_seed(3)
    x1, x2 = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    g = torch.rand(64) + 0.5
    y, rstd, xs = npu.add_rms_norm(x1, x2, g, 1e-6)
    assert torch.equal(xs, x1 + x2)
    assert torch.allclose(y, (x1 + x2) * torch.rsqrt((x1 + x2).pow(2).mean(-1, keepdim=True) + 1e-6) * g)
    codes, xo, scale = npu.add_rms_norm_dynamic_quant(x1, x2, g, None, 1e-6)
    assert torch.equal(xo, xs) and torch.equal((codes, scale)[0], npu.dynamic_quant(y)[0])
    sc = torch.full((64,), 0.02)
    c2, _ = npu.add_rms_norm_quant(x1, x2, g, sc, None, 1e-6)
    assert torch.equal(c2, npu.quantize(y, sc))


def test_scaled_masked_softmax_and_its_shape_limits():
    x = torch.randn(1, 2, 64, 64)
    mask = torch.ones(64, 64, dtype=torch.bool).triu(1)
    y = npu.scaled_masked_softmax(x, mask, 0.125)
    assert torch.allclose(y, torch.softmax((x * 0.125).masked_fill(mask, float("-inf")), -1))
    assert torch.equal(npu.scaled_masked_softmax(x, torch.zeros_like(mask), 0.125, True), y)
    assert "multiples of 32" in npu.check_scaled_masked_softmax((1, 2, 48, 64))
    assert npu.check_scaled_masked_softmax((1, 2, 64, 4096)) is None
    with pytest.raises(PtqcError, match=r"\[32, 4096\]"):
        npu.scaled_masked_softmax(torch.randn(1, 1, 16, 16), torch.zeros(16, 16, dtype=torch.bool))


def test_nothing_imports_torch_npu(models, tmp_path):
    """A stand-in torch_npu on the path records who imports it (the real one breaks torch without
    CANN): lowering, running the emulation, both exports and the diff target must not. (transformers
    itself imports an installed torch_npu when it checks for NPUs; that import is not ours.)"""
    trap = tmp_path / "trap" / "torch_npu"
    trap.mkdir(parents=True)
    log = tmp_path / "imports.txt"
    (trap / "__init__.py").write_text(
        "import traceback\n"
        f"open({str(log)!r}, 'a').write(''.join(f'{{f.filename}}\\n' for f in traceback.extract_stack()[:-1]"
        " if 'importlib' not in f.filename) + '--\\n')\n")
    code = f"""
import sys
from transformers.utils import is_torch_npu_available
is_torch_npu_available()  # transformers' own (cached) check imports it: forget that import
sys.modules.pop("torch_npu", None)
open({str(log)!r}, "w").close()
import torch, ptqc.cli, ptqc.diff, ptqc.lowering.compressed_tensors
import ptqc.lowering.ascend.ops as o
from ptqc import frontend, pipeline
from ptqc.lowering.ascend import export
o.dynamic_quant(torch.randn(2, 8))
qm = frontend.load({str(models["qwen2"])!r})
calib = torch.randint(0, 300, (2, 16))
pipeline.PassManager(pipeline.parse_pipeline("int8")).run(qm, pipeline.PassContext(quiet=True, calib=calib))
export.export(qm, {str(tmp_path / "exp")!r}, dtype="float16")  # C8 exports only for Qwen3-like classes: kv comes after
pipeline.PassManager(pipeline.parse_pipeline("kv:k=channel,v=channel,ascend")).run(
    qm, pipeline.PassContext(quiet=True, calib=calib))
qm(torch.randint(0, 300, (1, 16)))
"""
    env = {**os.environ, "PYTHONPATH": str(trap.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    importers = [stack.strip().splitlines()[-1] for stack in log.read_text().split("--")
                 if stack.strip()] if log.exists() else []
    ours = [f for f in importers if "site-packages" not in f]
    assert ours == [], ours
    r = subprocess.run([sys.executable, "-c", "import torch_npu"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and log.read_text().count("--") == len(importers) + 1  # the trap records
