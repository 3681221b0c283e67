"""`ptqc diff --web` in a real browser: Model Explorer's server (its peer venv, tools/explorer_env.py)
and a headless Chromium (Debian's package; tools/headless_chromium.py) with the network off. What a
person sees: both graphs side by side, the layer groups, the first divergent linear selected with its
quantization parameters in the info panel, the diff overlay's colour on it (the page's DOM and a
screenshot's pixels). Skips, saying why, where Chromium or the peer venv cannot be had."""
import io
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import headless_chromium  # tools/ (conftest puts it on sys.path)
from ptqc import artifact, diff, explorer, explorer_run, explorer_server, pipeline

ROOT = Path(__file__).resolve().parents[1]


def hex_rgb(h):
    return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))


def app_color(value, values, gradient):
    """The background Model Explorer gives ``value`` (its getColorFromGradient: linear, floored)."""
    lo, hi = min(values), max(values)
    t = (value - lo) / (hi - lo)
    for a, b in zip(gradient, gradient[1:]):
        if a["stop"] <= t <= b["stop"]:
            r = (t - a["stop"]) / (b["stop"] - a["stop"])
            return tuple(math.floor(x + (y - x) * r) for x, y in zip(hex_rgb(a["bgColor"]), hex_rgb(b["bgColor"])))


@pytest.fixture(scope="module")
def explorer_python():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "explorer_env.py")], capture_output=True, text=True)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def chromium():
    exe = headless_chromium.find()
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt-get where it can)")
    return exe


@pytest.fixture(scope="module")
def page(loaded, tmp_path_factory, explorer_python, chromium, monkeypatch_module):
    """The diff of the tiny qwen2 (float) and its W8A8 artifact, exported and opened in the browser."""
    root = tmp_path_factory.mktemp("explorer-browser")
    fp = artifact.save(loaded("qwen2"), root / "fp")
    qm = loaded("qwen2")
    torch.manual_seed(0)
    pipeline.PassManager(pipeline.parse_pipeline("int8")).run(
        qm, pipeline.PassContext(quiet=True, calib=torch.randint(0, 300, (2, 16))))
    q = artifact.save(qm, root / "int8")
    ta, tb = diff.open_target(str(fp)), diff.open_target(str(q))
    rep = diff.diff(ta, tb, torch.randint(0, 300, (1, 16)), threshold=1000.0)  # first below: the first linear
    sides = explorer_run.diff_sides(ta, tb, rep)
    data = explorer.export(sides, root / "export")
    monkeypatch_module.setenv("PTQC_EXPLORER_PYTHON", explorer_python)
    t0 = time.monotonic()
    proc, port = explorer_server.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with headless_chromium.Chromium(chromium, timeout=120) as c:
            c.open(explorer.url(port, data), 1400, 1000)
            c.wait_for("document.body.innerText.includes('first node below')", 120)
            c.wait_for("document.body.innerText.includes('Root-level nodes stats')", 60)
            time.sleep(1)  # the canvas draws after the panels
            out = {"text": c.eval("document.body.innerText"), "png": c.screenshot(), "external": list(c.external),
                   "backgrounds": c.eval("[...document.querySelectorAll('*')].map(e => getComputedStyle(e)"
                                         ".backgroundColor)"),
                   "version": c.eval("fetch('/api/v1/check_new_version').then(r => r.json())"),
                   "rep": rep, "sides": sides, "seconds": time.monotonic() - t0}
    finally:
        explorer_server.stop(proc)
    (root / "page.png").write_bytes(out["png"])
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_both_graphs_with_layer_groups(page):
    t = page["text"]
    assert "A-fp.json" in t and "B-int8.json" in t  # two panes
    root_stats = t[t.index("Root-level nodes stats"):]
    assert "model" in root_stats.split("Node data")[0]  # the module hierarchy as groups, with overlay stats
    assert "model/layers.0/self_attn/q_proj" in t  # namespace of the selected node
    layers = int(t.split("layer count")[1].split()[0])
    assert layers >= 2 * 9  # per decoder layer at least: layers.i, self_attn, mlp, norms, q/k/v/o, gate/up/down


def test_selected_node_shows_quant_params(page):
    t, rep = page["text"], page["rep"]
    assert rep["first_below"] == "model.layers.0.self_attn.q_proj"
    for line in ("weight.bits\n\t\n8", "weight.sym\n\t\ntrue", "input.method\n\t\ndynamic",
                 "w:int8 ch sym (int8); i:int8 tok sym (dynamic)", "scale weight_scale",
                 "first node below 1000 dB SQNR (model.layers.0.self_attn.q_proj)"):
        assert line in t, line
    assert "diff SQNR dB" in t and "diff max rel error" in t and "diff cosine" in t


def test_overlay_colours_in_dom_and_screenshot(page):
    """The selected node's chip of each diff overlay has the colour the app's gradient gives its value,
    in the DOM and on the screenshot (chip and node)."""
    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(page["png"])).convert("RGB")).astype(int)
    b = page["sides"][1]
    seen = set()
    for stem in ("diff-sqnr_db", "diff-max_rel", "diff-cosine"):
        nd = b.overlays[stem][b.graph["id"]]
        values = [r["value"] for r in nd["results"].values()]
        want = app_color(nd["results"][b.selected]["value"], values, nd["gradient"])
        assert want is not None and max(values) > min(values)
        assert f"rgb({want[0]}, {want[1]}, {want[2]})" in page["backgrounds"], stem
        assert int((np.abs(px - np.array(want)).max(axis=-1) <= 2).sum()) >= 1000, stem
        seen.add(want)
    assert len(seen) >= 2  # not one colour for everything


def test_offline(page):
    """The page asks nothing of the network but one font of the app's bundle (blocked: a local font is
    used); the server's release check answers without asking PyPI."""
    assert all(u.startswith("https://fonts.gstatic.com/") for u in page["external"]), page["external"]
    assert page["version"] == {"version": "", "runningVersion": "", "releaseUrl": "", "desktopAppUrl": ""}
    print(f"server + page: {page['seconds']:.1f}s; blocked external requests: {page['external']}")
