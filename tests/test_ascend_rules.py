"""The Ascend lowering rules one by one, on hand-built fake-quant graphs: each rule fires on its
pattern, emits its kernels (numerics checked against the fake-quant graph), and its check refuses
what the kernels cannot take with the reason. Also: the README names exactly the rules' kernels."""
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from ptqc import ops
from ptqc.errors import PtqcError
from ptqc.ir import QModel, execute
from ptqc.lowering.ascend import ops as npu
from ptqc.lowering.ascend.lower import PHASES, RULES, Lowering
from ptqc.model import WeightStore
from ascend_helpers import rel, targets

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]


class Tiny:
    """A fake-quant graph built by hand: inputs with shapes, constants in a WeightStore, nodes
    carrying the ptqc metadata the lowering reads (module, layer 0, role)."""

    def __init__(self):
        torch.manual_seed(0)
        self.g, self.store, self.inputs = fx.Graph(), WeightStore(), {}

    def input(self, name, *shape):
        p = self.g.placeholder(name)
        p.meta["shape"] = list(shape)
        self.inputs[name] = torch.randn(shape)
        return p

    def const(self, name, t):
        self.store[name] = t
        return self.g.get_attr(name)

    def op(self, target, *args, role=None, **kwargs):
        n = self.g.call_function(target, args, kwargs)
        n.meta["ptqc"] = {"module": f"layers.0.{role}", "layer": 0, "role": role}
        return n

    def act(self, x, bits=8, scale=None, zp=None, sym=True, clip=1.0, role="act_quant"):
        return self.op(ops.QUANTIZE_ACT, x, scale, zp, bits, 0, sym, *(() if clip == 1.0 else (clip,)), role=role)

    def linear(self, x, name, n, k, bits=8, zp=False, group=0, bias=False):
        lo, hi = (-8, 7) if bits == 4 else (-127, 127)
        codes = self.const(f"{name}.codes", torch.randint(lo, hi + 1, (n, k), dtype=torch.int8))
        scale = self.const(f"{name}.scale", torch.rand(n, k // group if group else 1) * 0.02 + 0.001)
        z = self.const(f"{name}.zp", torch.randint(-3, 4, (n, k // group if group else 1)).float()) if zp else None
        w = self.op(ops.DEQUANTIZE_WEIGHT, codes, scale, z, group, torch.float32, role=name)
        b = self.const(f"{name}.bias", torch.randn(n) * 0.1) if bias else None
        lin = self.op(ops.LINEAR, x, w, b, role=name)
        lin.meta["ptqc"]["quant"] = {"weight": {"bits": bits}}
        return lin

    def model(self, out) -> QModel:
        self.g.output(out)
        return QModel(graph=self.g, store=self.store, config=None)

    def run(self, qm):
        return execute(qm.graph, qm.store, self.inputs)


def lower(qm, **options) -> Lowering:
    lw = Lowering(qm, **options)
    lw.run()
    return lw


def w8a8(t, k=32, n=16, **act):
    x = t.input("x", 2, 5, k)
    return t.model(t.linear(t.act(x, **act), "proj", n, k, bias=True))


# ---- the table and the README --------------------------------------------------------------------
def test_rules_are_a_table_of_named_one_line_rules_in_phases():
    names = [r.name for r in RULES]
    assert len(set(names)) == len(names)
    assert [r.phase for r in RULES] == sorted((r.phase for r in RULES), key=PHASES.index)  # phases contiguous
    assert all("\n" not in r.doc and len(r.doc) < 120 and all(k.startswith("npu_") for k in r.kernels) for r in RULES)


def test_readme_names_exactly_the_kernels_the_rules_emit():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Ascend lowering"):]
    section = section[:section.index("\n## ", 3)]
    rewrites = section[section.index("The `ascend` pass rewrites"):section.index("keeps it as a float op.")]
    readme = set(re.findall(r"npu_[a-z0-9_]+", rewrites))
    emitted = {k for r in RULES for k in r.kernels}
    assert emitted - readme == set(), "kernels the rules emit that README.md's Ascend lowering section omits"
    assert readme - emitted == set(), "kernels README.md names that no rule emits"


# ---- attention -----------------------------------------------------------------------------------
def _attention(t, s=8, h=4, hkv=2, d=16, k_quant=None, v_quant=None, window=-1):
    q, k, v = t.input("q", 1, h, s, d), t.input("k", 1, hkv, s, d), t.input("v", 1, hkv, s, d)
    if k_quant is not None:
        k = t.act(k, scale=t.const("k_scale", torch.rand(hkv, 1, d) * 0.02 + 0.01) if k_quant else None,
                  role="k_cache_quant")
    if v_quant is not None:
        v = t.act(v, scale=t.const("v_scale", torch.rand(hkv, 1, d) * 0.02 + 0.01) if v_quant else None,
                  role="v_cache_quant")
    return t.model(t.op(ops.ATTENTION, q, k, v, d ** -0.5, role="attention", causal=True, window=window))


def test_attention_kv8():
    t = Tiny()
    qm = _attention(t, k_quant=True, v_quant=True)
    ref = t.run(qm)
    lw = lower(qm, attention="keep")  # a quantized cache lowers whatever the float attention mode
    assert lw.fired == {"attention_kv8": 1}
    fia = next(n for n in qm.graph.nodes if n.target == npu.FUSED_INFER_ATTENTION_SCORE)
    assert qm.store[fia.args[4].target].shape == (2, 2, 1, 16) and fia.args[12] == 3
    assert [n.meta["ptqc"]["role"] for n in qm.graph.nodes if n.target == npu.QUANTIZE] == ["k_cache_quant",
                                                                                          "v_cache_quant"]
    assert ops.QUANTIZE_ACT not in targets(qm) and rel(t.run(qm), ref) < 1e-5
    with pytest.raises(PtqcError, match="only one of K and V quantized"):
        lower(_attention(Tiny(), k_quant=True))
    with pytest.raises(PtqcError, match=r"per-token \(dynamic\) KV8 cache only when decoding"):
        lower(_attention(Tiny(), k_quant=False, v_quant=False))


def test_attention_fia():
    t = Tiny()
    qm = _attention(t, window=3)
    ref = t.run(qm)
    assert lower(qm).fired == {"attention_fia": 1}
    fia = next(n for n in qm.graph.nodes if n.target == npu.FUSED_INFER_ATTENTION_SCORE)
    assert fia.args[9:] == (2, 0, "BNSD", 4)  # a sliding window of 3: a band, pre_tokens 2
    assert torch.equal(t.run(qm), ref)  # float32: bit for bit
    with pytest.raises(PtqcError, match="multiple of num_key_value_heads"):
        lower(_attention(Tiny(), h=3, hkv=2))
    unknown = _attention(Tiny())
    for n in unknown.graph.nodes:
        n.meta.pop("shape", None)
    lw = lower(unknown, fallback=True)
    assert lw.refused == ["layers.0.attention: attention shapes are unknown (run shape propagation first)"]
    assert ops.ATTENTION in targets(unknown)


def test_attention_softmax():
    t = Tiny()
    qm = _attention(t, s=32)
    ref = t.run(qm)
    assert lower(qm, attention="softmax").fired == {"attention_softmax": 1}
    assert npu.SCALED_MASKED_SOFTMAX in targets(qm) and aten.repeat_interleave.self_int in targets(qm)  # GQA
    assert rel(t.run(qm), ref) < 1e-6
    add = _attention(Tiny(), s=128)
    lower(add, attention="add_softmax")
    assert npu.DROPOUT_WITH_ADD_SOFTMAX in targets(add) and npu.SCALED_MASKED_SOFTMAX not in targets(add)
    with pytest.raises(PtqcError, match="without a sliding window only"):
        lower(_attention(Tiny(), s=32, window=4), attention="softmax")
    with pytest.raises(PtqcError, match=r"\[32, 4096\].*H=40"):
        lower(_attention(Tiny(), s=32), attention="softmax", seqlen=40)


# ---- activation quantization + quantized matmuls --------------------------------------------------
def _w4a4(t, k=64, transform=None, clip=1.0):
    x = t.input("x", 2, 5, k)
    h = x
    if transform is not None:
        a = t.const("t.a", torch.linalg.qr(torch.randn(transform[0], transform[0]))[0])
        b = None if len(transform) == 1 else t.const("t.b", torch.linalg.qr(torch.randn(transform[1], transform[1]))[0])
        h = t.op(ops.TRANSFORM, x, a, b, role="online_hadamard")
    return t.model(t.linear(t.act(h, bits=4, clip=clip), "proj", 16, k, bits=4, bias=True))


def test_w4a4_transform():
    t = Tiny()
    qm = _w4a4(t, transform=(4, 16), clip=0.9)
    ref = t.run(qm)
    assert lower(qm, fuse=False).fired == {"w4a4_transform": 1}  # the clip ratio has no other kernel
    kq = next(n for n in qm.graph.nodes if n.target == npu.KRONECKER_QUANT)
    assert kq.args[3] == pytest.approx(0.9) and ops.TRANSFORM not in targets(qm)
    assert rel(t.run(qm), ref) < 1e-5
    t = Tiny()
    qm = _w4a4(t, k=128, transform=(128,))
    ref = t.run(qm)
    assert lower(qm).fired == {"w4a4_transform": 1} and npu.ROTATE_QUANT in targets(qm)
    assert rel(t.run(qm), ref) < 1e-5
    with pytest.raises(PtqcError, match="right factor's size N to be a multiple of 8.*clip ratio 0.9 has no other"):
        lower(_w4a4(Tiny(), k=48, transform=(4, 12), clip=0.9))
    misfit = _w4a4(Tiny(), k=48, transform=(4, 12))  # clip 1: the plain int4 kernel after a float transform
    assert lower(misfit).fired == {"w4a4_dynamic": 1, "float_transform": 1}


def test_w4a4_dynamic():
    t = Tiny()
    qm = _w4a4(t)
    ref = t.run(qm)
    assert lower(qm).fired == {"w4a4_dynamic": 1}
    assert npu.DYNAMIC_QUANT_INT4 in targets(qm) and qm.store["layers.0.proj.weight_packed"].shape == (16, 8)
    assert aten.add.Tensor in targets(qm)  # the float bias after the int4 matmul
    assert rel(t.run(qm), ref) < 1e-5
    with pytest.raises(PtqcError, match="clip ratio 0.9 lowers only fused with a Kronecker transform"):
        lower(_w4a4(Tiny(), clip=0.9))
    t = Tiny()
    x = t.input("x", 2, 5, 64)
    with pytest.raises(PtqcError, match="W4A4 needs int4 symmetric per-channel weights"):
        lower(t.model(t.linear(t.act(x, bits=4), "proj", 16, 64, bits=8)))


def test_w8a8_dynamic_smooth():
    def build(t):
        x = t.input("x", 2, 5, 32)
        h = t.op(aten.mul.Tensor, x, t.const("proj.smooth_scale", torch.rand(32) + 0.5), role="smooth_scale")
        return t.model(t.linear(t.act(h), "proj", 16, 32))

    t = Tiny()
    qm = build(t)
    ref = t.run(qm)
    assert lower(qm).fired == {"w8a8_dynamic_smooth": 1} and aten.mul.Tensor not in targets(qm)
    dq = next(n for n in qm.graph.nodes if n.target == npu.DYNAMIC_QUANT)
    assert dq.args[1].target == "proj.smooth_scale" and rel(t.run(qm), ref) < 1e-5
    naive = build(Tiny())
    assert lower(naive, fuse=False).fired == {"w8a8_dynamic": 1} and aten.mul.Tensor in targets(naive)


def test_w8a8_dynamic():
    t = Tiny()
    x = t.input("x", 2, 5, 32)
    q = t.act(x)
    qm = t.model(t.op(aten.add.Tensor, t.linear(q, "k", 16, 32), t.linear(q, "v", 16, 32)))
    ref = t.run(qm)
    assert lower(qm).fired == {"w8a8_dynamic": 1}
    assert targets(qm).count(npu.DYNAMIC_QUANT) == 1 and targets(qm).count(npu.QUANT_MATMUL) == 2  # shared
    assert rel(t.run(qm), ref) < 1e-5
    t = Tiny()  # int4 and int8 weights behind one int8 quantizer: no kernel combination takes the int4 one
    x = t.input("x", 2, 5, 32)
    q = t.act(x)
    with pytest.raises(PtqcError, match=r"W4A8 \(int8 activations x int4 weights\)"):
        lower(t.model(t.op(aten.add.Tensor, t.linear(q, "k", 16, 32, bits=4), t.linear(q, "v", 16, 32))))
    t = Tiny()
    x = t.input("x", 2, 5, 32)
    lw = lower(t.model(t.op(ops.LINEAR, t.act(x), t.const("w", torch.randn(16, 32)), None, role="proj")),
               fallback=True)
    assert lw.refused == ["layers.0.act_quant: its weight is float"]


def test_w4a8_weight_only():
    """Dense W4A8 as vllm-ascend serves it: the int8 quantizer dropped, the int4 weights on the weight-only kernel;
    equal to the fake-quant graph without the activation quantizer."""
    def build(act):
        t = Tiny()
        x = t.input("x", 2, 5, 64)
        q = t.act(x) if act else x
        return t, t.model(t.op(aten.add.Tensor, t.linear(q, "k", 16, 64, bits=4, group=32),
                                t.linear(q, "v", 16, 64, bits=4, group=32)))
    t, qm = build(True)
    ref = build(False)[0].run(build(False)[1])
    assert lower(qm).fired == {"w4a8_weight_only": 1, "weight_only": 2}
    assert npu.DYNAMIC_QUANT not in targets(qm) and targets(qm).count(npu.WEIGHT_QUANT_BATCHMATMUL) == 2
    assert rel(t.run(qm), ref) < 1e-6


def test_w8a8_static():
    t = Tiny()
    qm = w8a8(t, scale=t.const("proj.input_scale", torch.tensor([0.05])),
              zp=t.const("proj.input_zero_point", torch.tensor([3.0])), sym=False)
    ref = t.run(qm)
    assert lower(qm, truncate=False, int_bias=False).fired == {"w8a8_static": 1}
    assert npu.QUANTIZE in targets(qm) and rel(t.run(qm), ref) < 1e-5
    t = Tiny()
    qm = w8a8(t, scale=t.const("proj.input_scale", torch.tensor([0.05])))
    lower(qm)
    assert qm.store["layers.0.proj.deq_scale"].dtype == torch.int64  # npu_trans_quant_param's 19 bits
    assert qm.store["layers.0.proj.quant_bias"].dtype == torch.int32  # the bias folded in
    t = Tiny()
    x = t.input("x", 2, 5, 32)
    with pytest.raises(PtqcError, match="W8A8 needs int8 symmetric per-channel weights"):
        lower(t.model(t.linear(t.act(x, scale=t.const("s", torch.tensor([0.05]))), "proj", 16, 32, zp=True)))


def test_act_quant_unsupported():
    t = Tiny()
    lw = lower(w8a8(t, bits=6), fallback=True)
    assert lw.fired == {"act_quant_unsupported": 1} and lw.refused == [
        "layers.0.act_quant: only int8 activations (dynamic symmetric per token, static per tensor, or W8A8_MIX), "
        "int4 dynamic symmetric per-token ones and MX (blocks of 32) lower"]
    assert ops.QUANTIZE_ACT in targets(lw.qm) and ops.LINEAR in targets(lw.qm)  # kept as fake-quant ops
    t = Tiny()  # a per-channel static scale: no per-tensor quantize kernel takes it
    with pytest.raises(PtqcError, match="only int8 activations"):
        lower(w8a8(t, scale=t.const("s", torch.rand(32) * 0.1)))


# ---- weight-only, SwiGLU, transforms -------------------------------------------------------------
def test_weight_only():
    t = Tiny()
    x = t.input("x", 2, 5, 64)
    qm = t.model(t.linear(x, "proj", 16, 64, bits=4, zp=True, group=32, bias=True))
    ref = t.run(qm)
    assert lower(qm).fired == {"weight_only": 1}
    assert npu.WEIGHT_QUANT_BATCHMATMUL in targets(qm) and rel(t.run(qm), ref) < 1e-6
    t = Tiny()
    x = t.input("x", 2, 5, 64)
    with pytest.raises(PtqcError, match="group sizes that are multiples of 32 .got 16."):
        lower(t.model(t.linear(x, "proj", 16, 64, bits=4, group=16)))


def _mlp(t, inter=16):
    x = t.input("x", 2, 5, 32)
    q = t.act(x)
    gate, up = t.linear(q, "mlp.gate_proj", inter, 32), t.linear(q, "mlp.up_proj", inter, 32)
    h = t.op(aten.mul.Tensor, t.op(aten.silu.default, gate, role="gate"), up, role="up")
    return t.model(t.linear(t.act(h), "mlp.down_proj", 32, inter))


def test_swiglu_quant():
    t = Tiny()
    qm = _mlp(t)
    ref = t.run(qm)
    assert lower(qm).fired == {"w8a8_dynamic": 2, "swiglu_quant": 1}
    assert npu.SWIGLU_QUANT in targets(qm) and targets(qm).count(npu.QUANT_MATMUL) == 2  # gate/up as one
    assert qm.store["layers.0.mlp.gate_up_proj.weight"].shape == (32, 32)
    assert rel(t.run(qm), ref) < 5e-3  # integer kernels vs fake-quant: rounding flips only
    naive = _mlp(Tiny())
    assert lower(naive, fuse=False).fired == {"w8a8_dynamic": 2}
    wide = _mlp(Tiny(), inter=4104)  # 2 x 4104 > 8192: too wide for the kernel, left unfused
    assert "swiglu_quant" not in lower(wide).fired and npu.SWIGLU_QUANT not in targets(wide)


def test_float_transform():
    t = Tiny()
    x = t.input("x", 2, 5, 32)
    a, b = t.const("a", torch.randn(4, 4)), t.const("b", torch.randn(8, 8))
    qm = t.model(t.op(ops.TRANSFORM, x, a, b, role="online_hadamard"))
    ref = t.run(qm)
    assert lower(qm).fired == {"float_transform": 1}
    assert ops.TRANSFORM not in targets(qm) and rel(t.run(qm), ref) < 1e-6


# ---- norms -----------------------------------------------------------------------------------------
def _norm(t, add=True, quant=None, offset=0.0):
    """rms_norm(x [+ r]) feeding a quantizer + linear (or the output), the sum also read after."""
    x = t.input("x", 2, 5, 32)
    h = t.op(aten.add.Tensor, x, t.input("r", 2, 5, 32), role="residual") if add else x
    w = t.const("norm.weight", torch.rand(32) + 0.5)
    n = t.op(ops.RMS_NORM, h, w, 1e-6, *((offset,) if offset else ()), role="input_norm")
    if quant is not None:
        n = t.linear(t.act(n, **quant), "proj", 32, 32)
    return t.model(t.op(aten.add.Tensor, h, n, role="residual"))


def _static(t):
    return {"scale": t.const("proj.input_scale", torch.tensor([0.05]))}


@pytest.mark.parametrize("rule, quant, kernel", [
    ("add_rms_norm_dynamic_quant", lambda t: {}, npu.ADD_RMS_NORM_DYNAMIC_QUANT),
    ("add_rms_norm_quant", _static, npu.ADD_RMS_NORM_QUANT),
    ("add_rms_norm", None, npu.ADD_RMS_NORM)])
def test_add_rms_norm_fusions(rule, quant, kernel):
    t = Tiny()
    qm = _norm(t, quant=quant and quant(t))
    ref = t.run(qm)
    lw = lower(qm, truncate=False, int_bias=False)
    assert lw.fired[rule] == 1 and kernel in targets(qm)
    assert not any(n.target in (aten.add.Tensor, ops.RMS_NORM, npu.DYNAMIC_QUANT, npu.QUANTIZE) and
                   n.meta["ptqc"]["role"] != "residual" for n in qm.graph.nodes if n.op == "call_function")
    assert targets(qm).count(aten.add.Tensor) == 1  # the residual add is the kernel's sum output
    assert rel(t.run(qm), ref) < 1e-5
    t = Tiny()
    naive = _norm(t, quant=quant and quant(t))
    assert rule not in lower(naive, fuse=False).fired and npu.RMS_NORM in targets(naive)


def test_rms_norm():
    t = Tiny()
    qm = _norm(t, add=False, offset=1.0)  # Gemma's (1 + w): folded into the kernel's weight
    ref = t.run(qm)
    assert lower(qm).fired == {"rms_norm": 1}
    assert npu.RMS_NORM in targets(qm) and "norm.weight_plus_offset" in qm.store
    assert rel(t.run(qm), ref) < 1e-6
