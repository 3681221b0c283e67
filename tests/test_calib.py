"""The layer-by-layer engine: equals a full forward, observers compute what they claim,
propagation modes differ as documented, bad activations are named, memory stays bounded."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ptqc import calib, observers as O, pipeline
from ptqc.errors import PtqcError
from ptqc.ir import execute
from ptqc.weights import is_quantized
from ptqc.model import SafetensorsFile, WeightStore, write_safetensors

ROOT = Path(__file__).resolve().parents[1]


def layered(qm, ids, batch=2):
    r = calib.LayerRunner(qm, list(torch.split(ids, batch)))
    outs = {}
    for k in r.segments():
        r.run(k, on_output=outs.__setitem__ if k == "suffix" else None)
    return torch.cat([outs[i] for i in range(len(outs))])


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_layered_execution_equals_full_forward(loaded, ids, arch):
    qm = loaded(arch)
    x = ids(5, 33)
    full = qm(x)
    assert (layered(qm, x) - full).abs().max() <= 1e-5 * full.abs().max()
    pipeline.PassManager(pipeline.parse_pipeline("rtn:bits=3,group=32")).run(qm, pipeline.PassContext(quiet=True))
    full = qm(x)
    assert (layered(qm, x, batch=3) - full).abs().max() <= 1e-5 * full.abs().max()


def test_segments_cover_every_node_once(loaded):
    qm = loaded("qwen2")
    segs = calib.split(qm.graph)
    assert [s.key for s in segs] == ["prefix", "layer.0", "layer.1", "suffix"]
    names = [n.name for s in segs for n in s.nodes]
    assert len(names) == len(set(names))
    assert set(names) == {n.name for n in qm.graph.nodes if n.op in ("call_function", "output")}
    assert all(w.startswith("model.layers.1.") for w in segs[2].weights)
    assert segs[-1].weights == ["model.norm.weight", "lm_head.weight"]


def _linear_inputs(qm, x, node):
    seen, env = [], {}

    def hook(n, v):
        env[n.name] = v
        if n is node:
            seen.append(env[n.args[0].name])
    execute(qm.graph, qm.store, {"input_ids": x}, hook=hook)
    return seen[0].reshape(-1, seen[0].shape[-1]), env[node.name].reshape(-1, env[node.name].shape[-1])


def test_observers_compute_their_statistics(loaded, ids):
    qm = loaded("qwen2")
    x = ids(4, 19)
    q1 = qm.linears(role="q", layer=1)[0]
    xin, xout = _linear_inputs(qm, x, q1)
    obs = {q1: {"absmax": O.AbsMax(), "minmax": O.MinMax("output", per_channel=True), "mean": O.MeanAbs(),
                "h": O.Hessian(), "pct": O.Percentile(q=0.99), "pabs": O.Percentile(q=0.9, absolute=True),
                "few": O.Samples(max_tokens=10), "all": O.Samples(max_tokens=1000)}}
    r = calib.LayerRunner(qm, list(torch.split(x, 3)))
    r.run_prefix()
    r.run_layer(0)
    r.run_layer(1, observers=obs, commit=False)
    o = obs[q1]
    torch.testing.assert_close(o["absmax"].result(), xin.abs().amax(0))
    torch.testing.assert_close(o["minmax"].result()[0], xout.amin(0))
    torch.testing.assert_close(o["minmax"].result()[1], xout.amax(0))
    torch.testing.assert_close(o["mean"].result(), xin.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o["h"].result(), 2 * xin.t() @ xin / xin.shape[0], rtol=1e-4, atol=1e-5)
    s = xin.reshape(-1).sort().values
    assert o["pct"].result()[1] == s[round(0.99 * (s.numel() - 1))]
    assert o["pct"].result()[0] == s[round(0.01 * (s.numel() - 1))]
    a = xin.abs().reshape(-1).sort().values
    assert o["pabs"].result() == a[round(0.9 * (a.numel() - 1))]
    few = o["few"].result()
    assert few.shape == (10, xin.shape[1])
    assert all(any(torch.equal(row, y) for y in xin) for row in few)  # real rows of the input
    assert torch.equal(o["all"].result(), xin)  # everything fits: all rows, in order
    assert o["h"].tokens == 4 * 19


def test_percentile_sample_is_uniform_over_batches():
    torch.manual_seed(0)
    p = O.Percentile(q=0.5, max_values=2000, seed=1)
    for k in range(10):  # later batches must not dominate the sample
        p.update(torch.full((1000, 1), float(k)))
    counts = torch.bincount(p.sample.long(), minlength=10)
    assert counts.min() > 120 and counts.max() < 280


def _rtn_layer(qm, layer, bits=2):
    from ptqc import quant
    from ptqc.weights import set_quantized_weight, weight_of

    spec = quant.QuantSpec(bits, 32, False)
    for n in qm.linears(layer=layer):
        w = weight_of(qm, n).float()
        s, z = quant.compute_qparams(w, spec)
        set_quantized_weight(qm, n, spec, quant.quantize(w, s, z, spec), s, z, "test")


@pytest.mark.parametrize("propagate", ["float", "quantized"])
def test_calibrate_propagation_modes(loaded, ids, propagate):
    fp, qm = loaded("qwen2"), loaded("qwen2")
    x = ids(4, 17)
    ctx = pipeline.PassContext(quiet=True, calib=x)
    seen = {}

    def observe(i):
        return {n: {"h": O.Hessian()} for n in qm.linears(layer=i, role="q")}

    def apply(i, stats):
        seen[i] = next(iter(stats.values()))["h"].result()
        _rtn_layer(qm, i)

    summary = calib.calibrate(qm, ctx, observe, apply, propagate=propagate)
    assert summary["layers"] == 2 and summary["tokens"] == 68
    # the reference: layer-1 q input of the float model, and of the model whose layer 0 is quantized
    ref_q = loaded("qwen2")
    _rtn_layer(ref_q, 0)
    h = {}
    for name, m in (("float", fp), ("quantized", ref_q)):
        xin, _ = _linear_inputs(m, x, m.linears(layer=1, role="q")[0])
        h[name] = 2 * xin.t() @ xin / xin.shape[0]
    torch.testing.assert_close(seen[1], h[propagate], rtol=1e-4, atol=1e-5)
    other = "float" if propagate == "quantized" else "quantized"
    assert not torch.allclose(seen[1], h[other], rtol=1e-3, atol=1e-4)
    assert all(is_quantized(n) for i in (0, 1) for n in qm.linears(layer=i))


def test_nonfinite_activation_names_layer_and_module(loaded, ids):
    qm = loaded("qwen2")
    w = qm.store["model.layers.0.self_attn.o_proj.weight"].clone()
    w[3, 5] = float("nan")
    qm.store["model.layers.0.self_attn.o_proj.weight"] = w
    ctx = pipeline.PassContext(quiet=True, calib=ids(2, 9))
    with pytest.raises(PtqcError, match=r"non-finite.*model\.layers\.0\.mlp\.gate_proj \(layer 0"):
        calib.calibrate(qm, ctx, lambda i: {n: {"a": O.AbsMax()} for n in qm.linears(layer=i)},
                        lambda i, s: None)


def test_safetensors_stream_writer_round_trip(tmp_path):
    from safetensors.torch import load_file

    ts = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randint(-8, 8, (7,), dtype=torch.int8),
          "c": torch.tensor(2.5), "d": torch.zeros(0, 4), "e": torch.tensor([True, False])}
    write_safetensors(tmp_path / "x.safetensors", sorted(ts), lambda n: (tuple(ts[n].shape), ts[n].dtype),
                      ts.__getitem__, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))  # the reference reader agrees
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for n, t in ts.items():
        assert torch.equal(back[n], t) and torch.equal(f.read(n), t) and back[n].dtype == t.dtype
    assert f.metadata == {"format": "pt"}


def test_offload_moves_pass_outputs_to_disk_and_round_trips(loaded, ids, tmp_path):
    from ptqc import artifact

    ref, qm = loaded("qwen2"), loaded("qwen2")
    qm.store.offload_dir = tmp_path / "off"
    qm.store.offload_bytes = 20_000
    for m in (ref, qm):
        pipeline.PassManager(pipeline.parse_pipeline("rtn:bits=4,group=32")).run(m, pipeline.PassContext(quiet=True))
    assert len(list((tmp_path / "off").glob("*.safetensors"))) > 1
    assert sum(t.numel() * t.element_size() for t in qm.store.overlay.values()) <= 20_000
    x = ids(2, 13)
    assert torch.equal(qm(x), ref(x))
    back = artifact.load(artifact.save(qm, tmp_path / "a"))
    assert torch.equal(back(x), ref(x))
    assert qm.history[-1]["weights_changed"] == ref.history[-1]["weights_changed"] > 0


def test_calib_config_errors():
    assert pipeline.calib_config({"samples": 4}, seqlen=64).samples == 4
    with pytest.raises(PtqcError, match="unknown calibration setting 'sample'"):
        pipeline.calib_config({"sample": 4})
    with pytest.raises(PtqcError, match="samples=0 must be a positive integer"):
        pipeline.calib_config(samples=0)
    for raw in ("calib.txt", [["samples", 4]], 3):  # a recipe's `calib:` that is not a mapping
        with pytest.raises(PtqcError, match=r"recipe 'calib:' must be a mapping \(path, samples, "):
            pipeline.calib_config(raw)


def test_context_says_whether_calibration_data_was_used(loaded, ids):
    qm = loaded("qwen2")
    for calib in (ids(2, 16), pipeline.CalibConfig(samples=2, seqlen=16)):
        ctx = pipeline.PassContext(quiet=True, calib=calib)
        pipeline.PassManager(pipeline.parse_pipeline("rtn")).run(qm.clone(), ctx)
        assert not ctx.calibration_used
        pipeline.PassManager(pipeline.parse_pipeline("gptq:group=32")).run(qm.clone(), ctx)
        assert ctx.calibration_used and ctx.calibration_ids(qm).shape == (2, 16)


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    sys.path.insert(0, {tools!r})
    import torch
    from ptqc import frontend, calib, observers as O, pipeline
    from ptqc.model import steady_malloc
    steady_malloc()  # as the CLI does

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024

    peak = [0]
    stop = False
    def sample():
        while not stop:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    qm = frontend.load({model!r})
    qm.store.cache = {cache}
    ids = torch.randint(0, 500, (4, 32))
    base = rss()
    t = threading.Thread(target=sample); t.start()
    ctx = pipeline.PassContext(quiet=True, calib=ids)
    calib.calibrate(qm, ctx, lambda i: {{n: {{"h": O.AbsMax()}} for n in qm.linears(layer=i)}}, lambda i, s: None)
    stop = True; t.join()
    print(json.dumps({{"base": base, "peak": peak[0]}}))
""")


def test_layer_streaming_keeps_one_layer_in_memory(tmp_path):
    from make_tiny_model import make_model

    model = make_model(tmp_path / "m", "llama", layers=8, hidden=512, intermediate=1536, heads=8, kv_heads=8,
                       vocab=512)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    layer = size / 8
    out = {}
    for cache in (True, False):  # with the store's read cache on, release() must still free each layer
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(tools=str(ROOT / "tools"), model=str(model),
                                                                      cache=cache)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[cache] = json.loads(r.stdout.strip().splitlines()[-1])
        grew = out[cache]["peak"] - out[cache]["base"]
        assert grew < 4 * layer, (cache, grew / layer, out)  # ~one layer + activations, never all 8
