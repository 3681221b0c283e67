#!/usr/bin/env python3
"""Drive a headless Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages ending in NUL on file descriptors 3 and 4; standard library only).

    with Chromium() as c:
        c.open("http://127.0.0.1:8080/", 1400, 900)
        c.wait_for("document.title !== ''", 30)
        png = c.screenshot()

The browser runs with the network off (``--host-resolver-rules``: every host but 127.0.0.1 fails to
resolve); the addresses of requests to other hosts are kept in ``external``. Used by
``tests/test_explorer_browser.py`` and ``tools/explorer_screenshot.py``.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-unsafe-swiftshader", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
         "--remote-debugging-pipe")


def find() -> str | None:
    """The Chromium executable on PATH, if any."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Chromium:
    def __init__(self, exe: str | None = None, timeout: float = 60.0):
        self.exe, self.timeout = exe or find(), timeout
        if self.exe is None:
            raise FileNotFoundError("no chromium on PATH")
        self.profile = tempfile.mkdtemp(prefix="ptqc-chromium-")
        self.external: list[str] = []
        self.console: list[str] = []
        self._id, self._buf, self._session = 0, b"", None

    def __enter__(self):
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()

        def fds():  # the child reads on 3 and writes on 4 (copies above 9 first: the pipes may be 3 or 4)
            a, b = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)  # inheritable
            os.dup2(b, 4)
        self.log = open(os.path.join(self.profile, "stderr.log"), "w+b")
        self.proc = subprocess.Popen([self.exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        os.close(to_chrome)
        os.close(from_chrome)
        return self

    def __exit__(self, *exc):
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _event(self, msg: dict) -> None:
        p = msg.get("params", {})
        if msg.get("method") == "Network.requestWillBeSent":
            u = p["request"]["url"]
            if u.startswith(("http:", "https:", "ws:", "wss:")) and not u.split("/")[2].startswith("127.0.0.1"):
                self.external.append(u)
        elif msg.get("method") == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))

    def _why(self) -> str:
        """Chromium's exit status and last lines of its stderr."""
        self.log.flush()
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace").strip().splitlines()[-5:]
        return f" (exit status {self.proc.poll()}): " + " | ".join(tail)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe{self._why()}")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, timeout: float | None = None, **params):
        """Send one command (to the page once :meth:`open` attached to it); its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self._session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self._session
        try:
            os.write(self._w, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"chromium is gone{self._why()}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._event(m)

    def open(self, url: str, width: int = 1400, height: int = 900) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        """Evaluate ``expression`` until it is truthy (an exception counts as false while the page loads);
        its value (TimeoutError after ``timeout`` s)."""
        t0 = time.monotonic()
        while True:
            try:
                v = self.eval(expression)
            except RuntimeError:
                v = None
            if v:
                return v
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"not true after {timeout:g}s: {expression}")
            time.sleep(0.25)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
