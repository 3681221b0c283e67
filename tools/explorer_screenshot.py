#!/usr/bin/env python3
"""Screenshot of a directory written by ``ptqc inspect/diff --export`` as Model Explorer shows it
(headless Chromium, network off), e.g. the README's picture:

    python tools/explorer_screenshot.py EXPORT_DIR out.png [--size 1400x900] [--scale 0.6]
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headless_chromium import Chromium  # noqa: E402

from ptqc import explorer, explorer_server  # noqa: E402


def shrink(png: bytes, scale: float) -> bytes:
    """The PNG resized by ``scale``, in 256 colours."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    img.quantize(256).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="1400x900")
    ap.add_argument("--scale", type=float, default=1.0, help="Resize the PNG by this factor.")
    a = ap.parse_args(argv)
    w, h = map(int, a.size.split("x"))
    data = explorer.load_manifest(a.export_dir)
    proc, port = explorer_server.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Chromium(timeout=120) as c:
            c.open(explorer.url(port, data), w, h)
            c.wait_for("document.body.innerText.includes('NODE DATA PROVIDERS')", 120)
            time.sleep(2)
            png = c.screenshot()
    finally:
        explorer_server.stop(proc)
    png = shrink(png, a.scale) if a.scale != 1.0 else png
    a.out.write_bytes(png)
    print(f"wrote {a.out} ({len(png) // 1024} KiB)")


if __name__ == "__main__":
    main()
