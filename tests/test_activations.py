"""Calibration activations beyond the budget go to disk and come back bit for bit: spilling never
changes a result (GPTQ's staged run, the layer-by-layer forward, a whole compile)."""
import gc

import pytest
import torch

from ptqc import calib, pipeline
from ptqc.activations import Batches, default_budget, nbytes
from tests.test_calib import layered


def _vals(seed):
    g = torch.Generator().manual_seed(seed)
    return {"h": torch.randn(3, 5, 8, generator=g), "rope": (torch.randn(5, 4, generator=g), torch.ones(5, 4)),
            "ids": torch.arange(15).view(3, 5), "none": None}


def test_batches_spill_beyond_budget_and_round_trip(tmp_path):
    one = nbytes(_vals(0))
    assert one == (3 * 5 * 8 + 2 * 5 * 4) * 4 + 15 * 8
    b = Batches([_vals(i) for i in range(4)], budget=2 * one, directory=tmp_path)
    assert len(b) == 4 and b.spilled == 2 and b.in_memory() == 2 * one
    files = list(tmp_path.glob("acts-*/batch-*.pt"))
    assert len(files) == 2
    for i, v in enumerate(b):
        w = _vals(i)
        assert torch.equal(v["h"], w["h"]) and torch.equal(v["rope"][0], w["rope"][0]) and v["none"] is None
    b[3] = {"h": torch.zeros(1)}  # a spilled batch replaced: its old file goes
    assert len(list(tmp_path.glob("acts-*/batch-*.pt"))) <= 2 and torch.equal(b[-1]["h"], torch.zeros(1))
    assert [torch.equal(v["h"], _vals(i)["h"]) for i, v in enumerate(b[:2])] == [True, True]
    d = files[0].parent
    del b, v
    gc.collect()
    assert not d.exists()  # the spill directory goes with the object


def test_batches_without_directory_stay_in_memory(tmp_path):
    b = Batches([_vals(i) for i in range(3)], budget=0, directory=None)
    assert b.spilled == 0 and b.in_memory() == 3 * nbytes(_vals(0))
    assert default_budget() >= 1 << 30


def test_layered_forward_with_spilled_activations_is_identical(loaded, ids, tmp_path):
    qm = loaded("qwen2")
    x = ids(6, 17)
    ref = layered(qm, x)
    qm.store.offload_dir, qm.store.activation_bytes = tmp_path, 0
    assert torch.equal(layered(qm, x), ref)
    r = calib.LayerRunner(qm, list(torch.split(x, 2)))
    r.run("prefix")
    assert r.state.spilled == 6 and r.state.in_memory() == 0  # 3 batches of ids, then of prefix outputs


@pytest.mark.parametrize("passes", ["gptq:bits=3,group=32", "gptq:bits=4,group=32,propagate=quantized",
                                    "smooth,int8"])
def test_calibration_with_spilled_activations_is_bit_identical(loaded, ids, tmp_path, passes):
    ref, qm = loaded("qwen2"), loaded("qwen2")
    qm.store.offload_dir, qm.store.activation_bytes = tmp_path, 4096
    spills = []
    orig = calib.LayerRunner.run_prefix

    def run_prefix(self):
        orig(self)
        spills.append((self.qm.store.offload_dir is not None, self.state.spilled))

    calib.LayerRunner.run_prefix = run_prefix
    x = ids(24, 32)  # 3 batches of 8
    try:
        for m in (ref, qm):
            ctx = pipeline.PassContext(quiet=True, calib=x)
            pipeline.PassManager(pipeline.parse_pipeline(passes)).run(m, ctx)
    finally:
        calib.LayerRunner.run_prefix = orig
    assert {s for off, s in spills if not off} == {0} and min(s for off, s in spills if off) >= 3
    names = sorted(ref.store.overlay)
    assert names == sorted(qm.store.overlay) and names
    assert all(torch.equal(ref.store[n], qm.store[n]) for n in names)


def test_flatquant_training_with_spilled_activations_is_bit_identical(loaded, ids, tmp_path, monkeypatch):
    """flatquant reads its layer inputs from the runner's batches and keeps its float targets in a
    Batches with the budget left: both spill, and the trained and rewritten weights are the same bits."""
    from ptqc.passes import flatquant_train

    ref, qm = loaded("qwen2"), loaded("qwen2")
    qm.store.offload_dir, qm.store.activation_bytes = tmp_path, 4096
    spilled, orig = [], flatquant_train.float_targets

    def float_targets(model, states, store, reserved=0):
        targets, stats = orig(model, states, store, reserved)
        spilled.append((store.offload_dir is not None, targets.spilled, len(targets)))
        return targets, stats

    monkeypatch.setattr(flatquant_train, "float_targets", float_targets)
    x = ids(24, 32)  # 3 batches of 8
    for m in (ref, qm):
        ctx = pipeline.PassContext(quiet=True, calib=x)
        pipeline.PassManager(pipeline.parse_pipeline("flatquant:epochs=1")).run(m, ctx)
    assert {s for off, s, _ in spilled if not off} == {0}
    assert [s for off, s, n in spilled if off] == [n for off, _, n in spilled if off] and any(o for o, *_ in spilled)
    names = sorted(ref.store.overlay)
    assert names == sorted(qm.store.overlay) and names
    assert all(torch.equal(ref.store[n], qm.store[n]) for n in names)
