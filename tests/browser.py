"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ended by
a NUL byte on file descriptors 3 and 4), so the tests need no websocket client and open no port.

``with Browser() as b: b.open(url)`` loads a page and records every console error, uncaught exception and browser
log error (a script the Content-Security-Policy blocked, an image that failed to load); ``b.evaluate(js)`` returns a
value, ``b.screenshot()`` PNG bytes. :func:`chromium` finds the executable (None when absent).
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


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high(fds: tuple) -> tuple:
    """The pipe's two ends moved to descriptors above 9 (inheritable: the shell passes them on)."""
    out = []
    for fd in fds:
        out.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 10))
        os.close(fd)
    return tuple(out)


class Browser:
    def __init__(self, exe: str | None = None, width: int = 1300, height: int = 1000, timeout: float = 60.0):
        self.exe, self.width, self.height, self.timeout = exe or chromium(), width, height, timeout
        self.errors: list = []
        self._next, self._buf, self._events = 0, b"", []

    def __enter__(self):
        self._profile = tempfile.mkdtemp(prefix="mlc-chromium-")
        cmd_r, self._cmd_w = _high(os.pipe())
        self._res_r, res_w = _high(os.pipe())
        # The browser reads commands on fd 3 and writes replies on fd 4; bash puts the pipes there (from fds above
        # 9, so that neither redirection overwrites the other's source; dash takes single-digit fds only).
        args = [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", "about:blank"]
        self._stderr = open(os.path.join(self._profile, "stderr.log"), "wb")
        self._proc = subprocess.Popen([shutil.which("bash") or "/bin/bash", "-c", f'exec "$@" 3<&{cmd_r} 4>&{res_w}', "sh", *args],
                                      pass_fds=(cmd_r, res_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=self._stderr)
        os.close(cmd_r)
        os.close(res_w)
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        return self

    def __exit__(self, *exc):
        try:
            self._send({"id": self._id(), "method": "Browser.close"})
            self._proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - killed below
            pass
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)
        return False

    def _log_tail(self) -> str:
        with open(os.path.join(self._profile, "stderr.log"), "rb") as f:
            lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if "dbus" not in x]
        return "\n".join(lines[-15:])

    # --- the protocol -------------------------------------------------------------------------------------

    def _id(self) -> int:
        self._next += 1
        return self._next

    def _send(self, msg: dict) -> None:
        try:
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        except BrokenPipeError:
            raise ConnectionError(f"chromium exited ({self._proc.poll()}): {self._log_tail()}") from None

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._res_r], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._res_r, 1 << 20)
            if not chunk:
                raise ConnectionError(f"chromium closed its pipe ({self._proc.poll()}): {self._log_tail()}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        msg = {"id": self._id(), "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._event(reply)

    def call(self, method: str, params: dict | None = None) -> dict:
        return self._call(method, params, self._session)

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        self._events.append(method)
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
            self.errors.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")

    def wait_for(self, method: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while method not in self._events:
            self._event(self._recv(deadline))

    # --- what the tests use -------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        out = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression[:80]}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
