"""Real msModelSlim 26.1.0 exports (tests/data/msmodelslim-*/, remade by tools/make_msmodelslim_samples.py;
each README says its command) against ``ptqc check-export`` and vllm-ascend 0.23.0's real loader
(tools/vllm_ascend_load.py in the peer venv, one process for every sample, served in float16).

The checker's rules are what vllm-ascend's schemes need, so it accepts exactly the samples the loader
builds with every parameter filled (static W8A8 without weight_scale / weight_offset: created, never
read), and refuses the others with the reason the loader fails on: dense W4A16 (no linear scheme),
per-channel dense W4A8_DYNAMIC (group_size 0: divided by), C8 on Qwen2 (no C8 load_weights patch).
Each rule also catches a broken copy of a sample, in one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptqc.lowering.ascend import export as ax

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SAMPLES = sorted(p.name for p in DATA.glob("msmodelslim-*") if p.is_dir())
# sample -> (the loader's exception, what check-export says for each refused linear / attention)
REFUSED = {"msmodelslim-w4a16-qwen2": ("NotImplementedError", "has no dense W4A16 linear scheme"),
           "msmodelslim-w4a8-per-channel-qwen2": ("ZeroDivisionError", "needs the description's group_size > 0"),
           "msmodelslim-w8a8c8-qwen2": ("KeyError", "C8 does not load for model_type 'qwen2'")}
NEVER_READ = ("weight_scale", "weight_offset")  # static W8A8's: vllm-ascend creates them, reads neither
# checkpoint dtype -> parameter dtype the loader casts to (float16 serving of a float32 model)
CASTS = {("float32", "float16"), ("float32", "int8"), ("int64", "float16")}


def test_the_samples_cover_each_layout():
    kinds = {json.loads((DATA / s / ax.DESCRIPTION).read_text())["model_quant_type"] for s in SAMPLES}
    assert {"W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "W4A8_DYNAMIC"} <= kinds, kinds
    assert set(REFUSED) < set(SAMPLES) and len(SAMPLES) == 8


@pytest.mark.parametrize("sample", SAMPLES)
def test_check_export_accepts_what_vllm_ascend_loads_and_says_why_not(sample):
    problems = ax.check(DATA / sample)
    if sample not in REFUSED:
        assert problems == [], problems[:3]
        return
    assert problems and all(REFUSED[sample][1] in p and "\n" not in p for p in problems), problems[:3]


def _copy(tmp_path, sample, edit_desc=None, edit_tensors=None, edit_config=None):
    d = tmp_path / sample
    shutil.copytree(DATA / sample, d)
    for f in d.iterdir():
        f.chmod(0o644)
    if edit_desc:
        desc = json.loads((d / ax.DESCRIPTION).read_text())
        edit_desc(desc)
        (d / ax.DESCRIPTION).write_text(json.dumps(desc))
    if edit_tensors:
        (f,) = d.glob("quant_model_weight*.safetensors")
        t = load_file(str(f))
        edit_tensors(t)
        save_file(t, str(f))
    if edit_config:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return ax.check(d)


L0 = "model.layers.0"


def _pop(name):
    def edit(t):
        t.pop(name)
    return edit


def _drop_desc(name):
    return lambda desc: desc.pop(name)


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])
    return edit


BROKEN = {  # rule -> (sample, edits, the one line it must give)
    "static W8A8 needs quant_bias": ("msmodelslim-w8a8-iter-smooth-qwen2",
                                     {"edit_tensors": _pop(f"{L0}.mlp.up_proj.quant_bias"),
                                      "edit_desc": _drop_desc(f"{L0}.mlp.up_proj.quant_bias")},
                                     f"{L0}.mlp.up_proj: W8A8 needs {L0}.mlp.up_proj.quant_bias, which is missing"),
    "an optional tensor present is checked": (
        "msmodelslim-w8a8-qwen2", {"edit_tensors": _set(f"{L0}.self_attn.q_proj.weight_scale", lambda x: x.reshape(-1))},
        f"{L0}.self_attn.q_proj.weight_scale: expected float32 [32, 1], found F32 [32]"),
    "deq_scale follows the model dtype": (
        "msmodelslim-w8a8-iter-smooth-qwen2", {"edit_config": lambda c: c.update(torch_dtype="bfloat16", dtype="bfloat16")},
        f"{L0}.mlp.down_proj.deq_scale: expected float32 [32] (a bfloat16 model"),
    "W4A16 per-group codes pack along the output dimension": (
        "msmodelslim-w4a16-qwen2", {"edit_tensors": _set(f"{L0}.mlp.down_proj.weight", lambda w: w.reshape(64, 64))},
        f"{L0}.mlp.down_proj.weight: W4A16 1.0.0 with 2 scale column(s): expected int8 [32, 64], found [64, 64]"),
    "W4A16 scales have one column per group": (
        "msmodelslim-w4a16-qwen2", {"edit_tensors": _set(f"{L0}.mlp.down_proj.weight_scale", lambda s: s[:, :1].contiguous())},
        f"{L0}.mlp.down_proj.weight_scale: expected float32 [32, 4], found F32 [64, 1]"),
    "W4A8 needs its second-level scales": (
        "msmodelslim-w4a8-qwen2", {"edit_tensors": _pop(f"{L0}.mlp.down_proj.weight_scale_second"),
                                   "edit_desc": _drop_desc(f"{L0}.mlp.down_proj.weight_scale_second")},
        f"{L0}.mlp.down_proj: W4A8_DYNAMIC needs {L0}.mlp.down_proj.weight_scale_second, which is missing"),
    "W4A8 second-level scales per group": (
        "msmodelslim-w4a8-qwen2", {"edit_tensors": _set(f"{L0}.mlp.down_proj.weight_offset_second", lambda s: s[:, :1].contiguous())},
        f"{L0}.mlp.down_proj.weight_offset_second: expected float or int64 [64, 2], found I64 [64, 1]"),
    "W8A8_DYNAMIC weight int8": (
        "msmodelslim-w8a8-dynamic-qwen2", {"edit_tensors": _set(f"{L0}.mlp.up_proj.weight", lambda w: w.float())},
        f"{L0}.mlp.up_proj.weight: W8A8_DYNAMIC weight must be int8, found F32"),
}


@pytest.mark.parametrize("rule", BROKEN)
def test_each_rule_rejects_a_broken_copy_of_a_sample_in_one_line(tmp_path, rule):
    sample, edits, expect = BROKEN[rule]
    assert ax.check(DATA / sample) == [] or sample in REFUSED
    problems = _copy(tmp_path, sample, **edits)
    assert any(p.startswith(expect) for p in problems), problems[:3]
    assert all("\n" not in p for p in problems)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One loader process over every sample, in float16 (their deq_scale is int64: a float16 layout)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "vllm_ascend_env.py")], capture_output=True, text=True)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    peer = json.loads(r.stdout.strip().splitlines()[-1])
    root = tmp_path_factory.mktemp("msms")
    cmd = [peer["python"], str(ROOT / "tools" / "vllm_ascend_load.py"), *(str(DATA / s) for s in SAMPLES),
           "--dtype", "float16", "--json", str(root / "report.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={"PYTHONPATH": peer["pythonpath"],
                       "PATH": "/usr/bin:/bin", "HOME": str(root)})
    assert r.returncode == 0, r.stderr[-4000:]
    return {Path(d).name: rep for d, rep in json.loads((root / "report.json").read_text())["dirs"].items()}


def _tensors(d: Path) -> dict:
    out = {}
    for f in d.glob("quant_model_weight*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_vllm_ascend_loads_each_accepted_sample_with_every_parameter_filled_once(report):
    assert sorted(report) == SAMPLES
    for sample, rep in report.items():
        if sample in REFUSED:
            assert not rep["ok"] and rep["error"].startswith(REFUSED[sample][0]), f"{sample}: {rep.get('error')}"
            continue
        assert rep["ok"], f"{sample}: {rep.get('error')}"
        assert rep["refilled"] == [], sample
        tensors = _tensors(DATA / sample)
        for p in rep["unfilled"]:  # only static W8A8's never-read scales, and only where the export has none
            suffix = p.rsplit(".", 1)[1]
            assert suffix in NEVER_READ and not any(n.endswith(f".{suffix}") for n in tensors), f"{sample}: {p}"
        calls = [c | {"param": p} for p, v in rep["params"].items() for c in v["calls"]]
        assert sorted((c["dtype"], tuple(c["shape"])) for c in calls) == \
            sorted((str(t.dtype)[6:], tuple(t.shape)) for t in tensors.values()), sample  # each tensor once
        casts = {(c["dtype"], c["param_dtype"]) for c in calls if c["dtype"] != c["param_dtype"]}
        assert casts <= CASTS, f"{sample}: {casts}"
        for n, t in tensors.items():  # the casts to int8 (input_offset) and of int64 offsets are exact
            if n.endswith(("input_offset", "weight_offset_second")):
                assert torch.equal(t, t.round()) and t.abs().max() <= 127, f"{sample}: {n}"


def _file_weight(t: dict, base: str, kind: str) -> torch.Tensor:
    """(codes + weight_offset) * weight_scale of one linear as the sample stores it, unpacked here: W4A16
    two codes per byte, low nibble first, along the output dimension when per group (several scale
    columns), along the input dimension per channel."""
    if f"{base}.weight_scale" not in t:  # iter_smooth's static W8A8: the weight scale is deq_scale / input_scale
        deq = t[f"{base}.deq_scale"]
        deq = (deq & 0xFFFFFFFF).to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq.float()
        return t[f"{base}.weight"].float() * (deq / t[f"{base}.input_scale"].float())[:, None]
    w, s, o = t[f"{base}.weight"], t[f"{base}.weight_scale"].float(), t[f"{base}.weight_offset"].float()
    if kind == "W4A8_DYNAMIC":  # 1.0.0: pairs along the output dimension; per group: scale x scale_second
        lo, hi = (w.to(torch.int16) << 12 >> 12), (w.to(torch.int16) << 8 >> 12)
        w = torch.stack([lo, hi], 1).reshape(-1, w.shape[1])
        second = t.get(f"{base}.weight_scale_second")
        if second is not None and not bool((second == 1).all()):
            s = s * second.float()
        o = torch.zeros_like(s)  # symmetric
    if kind == "W4A16":
        lo, hi = (w.to(torch.int16) << 12 >> 12), (w.to(torch.int16) << 8 >> 12)  # sign-extended nibbles
        if s.shape[1] > 1:
            w = torch.stack([lo, hi], 1).reshape(-1, w.shape[1])
        else:
            w = torch.stack([lo, hi], -1).reshape(w.shape[0], -1)
    g = w.shape[1] // s.shape[1]
    return ((w.float().reshape(w.shape[0], -1, g) + o[..., None]) * s[..., None]).reshape(w.shape)


@pytest.mark.parametrize("sample", SAMPLES)
def test_ptqc_reads_each_sample_back_to_its_stored_weights(sample):
    """ptqc's reader (``ptqc eval`` / ``diff`` of the directory): every quantized linear computes with
    exactly the weights the sample stores; the model runs to finite logits."""
    from ptqc.ir import info
    from ptqc.weights import dequantized_weight

    d = DATA / sample
    desc = json.loads((d / ax.DESCRIPTION).read_text())
    (f,) = d.glob("quant_model_weight*.safetensors")
    t = load_file(str(f))
    qm = ax.load(d)
    n = 0
    for lin in qm.linears():
        base = info(lin)["module"]
        kind = desc.get(f"{base}.weight", "FLOAT")
        if kind == "FLOAT":
            continue
        torch.testing.assert_close(dequantized_weight(qm, lin).float(), _file_weight(t, base, kind), rtol=0, atol=0)
        n += 1
    assert n == sum(1 for k, v in desc.items() if k.endswith(".weight") and v != "FLOAT") > 0
    assert torch.isfinite(qm(torch.randint(0, 512, (1, 8)))).all()
