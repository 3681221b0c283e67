"""W4A4 Ascend lowering: int4 packing order, per-token int4 quantization, int4 x int4 quant_matmul,
the fused transform + quant kernels (npu_kronecker_quant, npu_rotate_quant) against their formulas,
and lowered-vs-fake-quant logits for w4a4, rotate+w4a4 and flatquant tiny models."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ptqc import ops, quant
from ptqc.errors import PtqcError
from ptqc.ir import is_op
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import kernel_counts, kernel_report
from ascend_helpers import rel as _rel, run as _run, targets as _targets


def _int4_spec(clip=1.0):
    return quant.QuantSpec(4, 0, True, clip)


# ---- ops ---------------------------------------------------------------------------------------
def test_int4x8_packing_is_low_nibble_first_and_the_w4a16_byte_layout_as_int32():
    c = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int8)
    w = npu.pack_int4x8(c)
    assert w.dtype == torch.int32 and w.shape == (1, 1)
    assert w.item() == 0x87654321 - (1 << 32)  # element j in bits [4j, 4j + 4), two's complement nibbles
    assert npu.pack_int4x8(torch.tensor([[-1, 0, 0, 0, 0, 0, 0, 0]])).item() == 0xF
    torch.manual_seed(0)
    r = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(npu.pack_int4x8(r), quant.pack_int4(r).view(torch.int32))  # little-endian int32 view
    assert torch.equal(npu.unpack_int4x8(npu.pack_int4x8(r)), r)
    assert torch.equal(npu.convert_weight_to_int4pack(r.int()), npu.pack_int4x8(r))
    with pytest.raises(PtqcError, match=r"\[-8, 7\]"):
        npu.convert_weight_to_int4pack(torch.full((1, 8), 8, dtype=torch.int32))
    with pytest.raises(PtqcError, match="multiple of 8"):
        npu.pack_int4x8(torch.zeros(1, 12, dtype=torch.int8))


def test_dynamic_quant_int4_rowmax_over_7_ties_to_even_and_zero_rows():
    x = torch.tensor([[7.0, 3.5, -3.5, 2.5, 1.5, 0.5, -0.5, -2.5],
                      [0.0] * 8])
    codes, scale = npu.dynamic_quant_int4(x)
    assert codes.dtype == torch.int32 and codes.shape == (2, 1) and scale.tolist() == [1.0, 0.0]
    assert npu.unpack_int4x8(codes).tolist() == [[7, 4, -4, 2, 2, 0, 0, -2], [0] * 8]
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 64) * 2).to(torch.float16)
    codes, scale = npu.dynamic_quant_int4(x)
    assert codes.shape == (3, 5, 8) and scale.shape == (3, 5)
    assert torch.equal(scale, x.float().abs().amax(-1) / 7)
    s, _ = quant.compute_qparams(x.float(), _int4_spec())
    assert torch.equal(npu.unpack_int4x8(codes), quant.quantize(x.float(), s, None, _int4_spec()))
    sm = torch.rand(64) + 0.5
    assert all(torch.equal(a, b) for a, b in zip(npu.dynamic_quant_int4(x, sm), npu.dynamic_quant_int4(x.float() * sm)))
    with pytest.raises(PtqcError, match="multiple of 8"):
        npu.dynamic_quant_int4(torch.randn(2, 12))


def test_int4_quant_matmul_accumulates_in_int32_for_both_weight_layouts():
    torch.manual_seed(2)
    a = torch.randint(-8, 8, (2, 5, 64), dtype=torch.int8)
    w = torch.randint(-8, 8, (48, 64), dtype=torch.int8)  # [n, k]
    ref = a.long() @ w.t().long()
    x1 = npu.pack_int4x8(a)
    along_k = npu.convert_weight_to_int4pack(w.int()).t()  # (k / 8, n): what the lowering passes
    along_n = npu.pack_int4x8(w.t().contiguous())  # (k, n / 8)
    for x2 in (along_k, along_n):
        acc = npu.quant_matmul(x1, x2, torch.ones(1), output_dtype=torch.int32)
        assert acc.dtype == torch.int32 and torch.equal(acc.long(), ref)
        with FakeTensorMode():
            fake = npu.quant_matmul(torch.empty(x1.shape, dtype=torch.int32), torch.empty(x2.shape, dtype=torch.int32),
                                    torch.ones(1), output_dtype=torch.float32)
        assert fake.shape == (2, 5, 48)
    ws, ts = torch.rand(48) / 100, torch.rand(2, 5) / 100
    out = npu.quant_matmul(x1, along_k, ws, pertoken_scale=ts, output_dtype=torch.float32)
    assert torch.equal(out, ref.float() * ws * ts[..., None])
    with pytest.raises(PtqcError, match="fits neither"):
        npu.quant_matmul(x1, npu.pack_int4x8(torch.zeros(16, 48, dtype=torch.int8)), ws)


def test_kronecker_quant_is_p1_x_p2_then_clipped_int4_per_token():
    torch.manual_seed(3)
    m, n = 4, 16
    x = torch.randn(3, 2, m * n) * 3
    a, b = torch.linalg.qr(torch.randn(m, m))[0], torch.linalg.qr(torch.randn(n, n))[0]
    for clip in (1.0, 0.6):
        codes, scale = npu.kronecker_quant(x, a.t(), b, clip)
        assert codes.shape == (3, 2, m * n // 8) and scale.shape == (3, 2)
        y = ((a.t() @ x.reshape(3, 2, m, n)) @ b).reshape(3, 2, m * n)
        assert torch.equal(scale, y.abs().amax(-1) * clip / 7)
        q = npu.unpack_int4x8(codes)
        assert torch.equal(q, torch.clamp(torch.round(y / scale[..., None]), -8, 7).to(torch.int8))
        # p1 = a^T, p2 = b is ptqc's transform(x, a, b) = x (a kron b) followed by the shared quantizer
        t = ops.transform(x, a, b)
        assert torch.allclose(q.float() * scale[..., None], quant.fake_quant_act(t, None, None, _int4_spec(clip)),
                              atol=1e-6)
    assert int(q.min()) == -8 and int(q.max()) == 7  # clip 0.6 saturates both ends
    # a tie: identity factors, row max 7 -> scale 1, 2.5 -> 2 and -1.5 -> -2 (half to even)
    row = torch.tensor([[7.0, 2.5, -1.5, 0.5] + [0.0] * 12])
    c, s = npu.kronecker_quant(row, torch.eye(2), torch.eye(8))
    assert s.tolist() == [1.0] and npu.unpack_int4x8(c)[0, :4].tolist() == [7, 2, -2, 0]
    assert "multiple of 8" in npu.check_kronecker_quant(16, 12)
    with pytest.raises(PtqcError, match="multiple of 8"):
        npu.kronecker_quant(torch.randn(2, 48), torch.eye(4), torch.eye(12))


def test_rotate_quant_rotates_each_block_then_quantizes():
    torch.manual_seed(4)
    x = torch.randn(3, 256)
    r = torch.linalg.qr(torch.randn(64, 64))[0]
    h = (x.reshape(3, 4, 64) @ r).reshape(3, 256)
    c4, s4 = npu.rotate_quant(x, r, True)
    ref4 = npu.dynamic_quant_int4(h)
    assert torch.equal(c4, ref4[0]) and torch.equal(s4, ref4[1])
    c8, s8 = npu.rotate_quant(x, r, False)
    ref8 = npu.dynamic_quant(h)
    assert c8.dtype == torch.int8 and torch.equal(c8, ref8[0]) and torch.equal(s8, ref8[1])
    assert "[16, 1024]" in npu.check_rotate_quant(8, 256)
    assert "divisible by 8 and by K" in npu.check_rotate_quant(64, 296)
    with pytest.raises(PtqcError, match=r"\[128, 16000\]"):
        npu.rotate_quant(torch.randn(2, 64), torch.eye(64))


# ---- lowering ----------------------------------------------------------------------------------
def test_w4a4_lowers_to_int4_dynamic_quant_and_int4_quant_matmul(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "w4a4", ids(4, 16))
    x = ids(2, 16)
    ref = qm(x)
    _run(qm, "ascend")
    assert _rel(qm(x), ref) < 1e-5  # same int4 codes; int32 sums vs float sums
    for c in kernel_counts(qm).values():
        assert (c["standalone_quant"], c["fused_quant"], c["quant_matmul"]) == (4, 0, 7)
    assert npu.DYNAMIC_QUANT_INT4 in _targets(qm) and npu.DYNAMIC_QUANT not in _targets(qm)
    w = qm.store["model.layers.0.mlp.down_proj.weight_packed"]
    assert w.dtype == torch.int32 and tuple(w.shape) == (128, 256 // 8)  # [n, k / 8], packed along k
    assert not any(is_op(n, ops.QUANTIZE_ACT) or is_op(n, ops.LINEAR) and n.meta["ptqc"].get("layer") is not None
                   for n in qm.graph.nodes)


def test_rotate_w4a4_fuses_the_down_proj_hadamard_into_kronecker_quant(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "rotate,w4a4", ids(4, 16))
    x = ids(2, 16)
    ref = qm(x)
    fused, naive = qm.clone(), qm.clone()
    _run(fused, "ascend")
    _run(naive, "ascend:fuse=false")
    for low in (fused, naive):
        assert _rel(low(x), ref) < 1e-5
        assert ops.TRANSFORM not in _targets(low)
    for c in kernel_counts(fused).values():  # down_proj: kronecker_quant; Q/K Hadamards: float matmuls
        assert (c["standalone_quant"], c["fused_quant"], c["float_transform"]) == (3, 1, 2)
    for c in kernel_counts(naive).values():
        assert (c["standalone_quant"], c["fused_quant"], c["float_transform"]) == (4, 0, 3)
    kq = next(n for n in fused.graph.nodes if n.target == npu.KRONECKER_QUANT)
    assert kq.args[3] == 1.0 and fused.store[kq.args[1].target].shape == (16, 16)  # 256 = 16 x 16


def test_rotate_quant_takes_a_single_rotation_before_int4(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "rotate,w4a4", ids(4, 16))
    for t in [n for n in qm.graph.nodes if is_op(n, ops.TRANSFORM) and n.meta["ptqc"]["role"] == "online_hadamard"
              and "mlp" in n.meta["ptqc"]["module"]]:  # x (a kron b) as one [256, 256] matrix: x H
        h = torch.kron(qm.store[t.args[1].target], qm.store[t.args[2].target])
        qm.store[t.args[1].target + "_full"] = h
        with qm.graph.inserting_before(t):
            t.args = (t.args[0], qm.graph.get_attr(t.args[1].target + "_full"), None)
    qm.graph.eliminate_dead_code()
    x = ids(2, 16)
    ref = qm(x)
    _run(qm, "ascend")
    assert _targets(qm).count(npu.ROTATE_QUANT) == 2 and npu.KRONECKER_QUANT not in _targets(qm)
    assert _rel(qm(x), ref) < 1e-5


def test_flatquant_lowers_every_transform_quant_pair_to_kronecker_quant(loaded, ids):
    qm = loaded("qwen2")
    _run(qm, "flatquant:epochs=1", ids(4, 16))
    x = ids(2, 16)
    ref = qm(x)
    rows = kernel_report(qm)  # what `ptqc inspect --ops` shows
    assert all((r["fused"], r["fused_kernels"], r["quant_matmul"]) == (0, 4, 7) for r in rows)
    low = qm.clone()
    _run(low, "ascend:fuse=false")  # the learned clip ratio has no other kernel: fused even with fuse=false
    assert _rel(low(x), ref) < 1e-5
    kqs = [n for n in low.graph.nodes if n.target == npu.KRONECKER_QUANT]
    assert len(kqs) == 8 and all(0 < n.args[3] < 1 for n in kqs)
    for c in kernel_counts(low).values():  # q/k cache transforms (x K, no quantizer after) stay float matmuls
        assert (c["standalone_quant"], c["fused_quant"], c["quant_matmul"], c["float_transform"]) == (0, 4, 7, 2)


def test_w4a4_refusals(loaded, ids):
    calib = ids(4, 16)
    w4a8 = loaded("qwen2")
    _run(w4a8, "w4a8", calib)
    low = w4a8.clone()  # W4A8 lowers as vllm-ascend serves it: weight-only int4 matmuls on float activations
    _run(low, "ascend")
    kernels = {n.target for n in low.graph.nodes if n.op == "call_function"}
    assert npu.WEIGHT_QUANT_BATCHMATMUL in kernels and npu.DYNAMIC_QUANT not in kernels
    grouped = loaded("qwen2")
    _run(grouped, "w4a4:w_group=32", calib)
    with pytest.raises(PtqcError, match="W4A4 needs int4 symmetric per-channel weights"):
        _run(grouped.clone(), "ascend")
    clipped = loaded("qwen2")
    _run(clipped, "w4a4", calib)
    for q in [n for n in clipped.graph.nodes if is_op(n, ops.QUANTIZE_ACT)]:
        q.args = (*q.args[:6], 0.9)  # a clip ratio without a transform before it
    with pytest.raises(PtqcError, match="clip ratio 0.9 lowers only fused with a Kronecker.*fallback=true"):
        _run(clipped.clone(), "ascend")
    x = ids(2, 16)
    ref = clipped(x)
    rec = _run(clipped, "ascend:fallback=true")
    assert len(rec[-1]["summary"]["refused"]) == 8 and _rel(clipped(x), ref) < 1e-6
