"""A real GCS JSON API server for tests and benchmarks, and one proxy in front of it.

``Emulator`` runs the ``gcp-storage-emulator`` package (``pip install -e '.[dev]'``) in a subprocess on
127.0.0.1 at a free port, in memory, until ``stop()``.

``Proxy`` sits between gcsfs and the emulator and does three jobs:

* it accepts any number of client connections (HTTP/1.1 keep-alive, listen backlog 1024) and forwards
  over at most ``upstream_connections`` (default 4) simultaneous connections to the emulator, which is a
  single-threaded ``http.server`` with a listen backlog of 5: more than a handful of simultaneous
  connections to it stall on TCP SYN retries (seconds each);
* ``latency_ms`` adds that delay to every request before it is forwarded, *without* holding an upstream
  connection, as network round-trip time would (a real GCS front end serves thousands of requests at once);
* ``add_fault(status, ...)`` answers matching requests with an error instead of forwarding them: transient
  (the first ``times`` matches get 503 or 429) or permanent (``times=None``: 403 or 404 every time).

It counts every request (``proxy.log``: ``(method, path, status)`` with the path URL-decoded), so a test can
say how many reads an epoch made.

``RemoteProxy`` runs a ``Proxy`` in its own process (``python tests/gcs_server.py --upstream URL``) and drives it
over a small control API under ``/__proxy__/`` with the same methods; ``GCS`` (what the ``gcs_server`` and
``gcs`` fixtures in conftest.py yield) is an emulator behind a ``RemoteProxy`` plus the environment that points
gcsfs at it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ray_head import free_port

HOST = "127.0.0.1"

# Set before gcsfs is imported: gcsfs >= 2025 otherwise swaps in its "zonal / hierarchical namespace"
# filesystem, whose first call on a bucket probes a gRPC API the emulator lacks and waits 60 s or more.
GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon",
           "GOOGLE_CLOUD_PROJECT": "test-project"}


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Emulator:
    """``gcp-storage-emulator start --in-memory`` in a subprocess; ``endpoint`` is its ``http://host:port``."""

    def __init__(self, startup_timeout: float = 60.0):
        self._log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
        for _ in range(5):  # a free port can be taken between our probe and the server's bind: retry
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", HOST, "--port", str(self.port),
                 "--in-memory", "-q"], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready(startup_timeout):
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError(f"gcp-storage-emulator did not start; its output is in {self._log.name}")

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if _http("GET", self.endpoint + "/", timeout=2)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def create_bucket(self, name: str) -> None:
        """A bucket without soft delete (the emulator's default keeps deleted objects in memory for 7 days)."""
        doc = {"name": name, "softDeletePolicy": {"retentionDurationSeconds": "0"}}
        status, body = _http("POST", self.endpoint + "/storage/v1/b?project=test-project", json.dumps(doc).encode())
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {name}: HTTP {status} {body[:200]!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


class Fault:
    """Answer matching requests with ``status``: after letting ``after`` matches through, the next ``times``
    matches (every later match when ``times`` is None). ``method`` is an HTTP method or None for any;
    ``path`` a regex searched in the URL-decoded path and query (``b/bucket/o/run/metrics.json``).
    ``seen`` counts matching requests, ``hits`` the errors sent."""

    def __init__(self, status: int, method: str | None = None, path: str | None = None, times: int | None = 1,
                 after: int = 0):
        self.status, self.method, self.times, self.after = status, method, times, after
        self.path = re.compile(path) if path else None
        self.seen = self.hits = 0

    def take(self, method: str, target: str) -> bool:
        if (self.method and method != self.method) or (self.path and not self.path.search(target)):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True

    def __repr__(self) -> str:
        return (f"Fault({self.status}, {self.method}, {self.path.pattern if self.path else None}, times={self.times}, "
                f"after={self.after}, hits={self.hits})")


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "te", "trailer",
        "upgrade", "host"}
_MESSAGES = {403: "Forbidden: the caller does not have storage.objects access (injected by the test proxy)",
             404: "No such object (injected by the test proxy)",
             429: "Too many requests (injected by the test proxy)",
             503: "Service unavailable (injected by the test proxy)"}


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list] | None:
    first = await reader.readline()
    while first in (b"\r\n", b"\n"):  # tolerate stray blank lines between keep-alive requests
        first = await reader.readline()
    if not first:
        return None
    headers = []
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    return first.decode("latin-1").rstrip("\r\n"), headers


async def _read_body(reader: asyncio.StreamReader, headers: list, until_eof: bool) -> bytes:
    h = {k.lower(): v for k, v in headers}
    if "chunked" in h.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()
    if "content-length" in h:
        return await reader.readexactly(int(h["content-length"]))
    return await reader.read() if until_eof else b""


class Proxy:
    """HTTP proxy in front of ``upstream`` (``http://host:port``); runs its own event loop in a thread.

    ``endpoint`` is what ``STORAGE_EMULATOR_HOST`` should point at. See the module docstring.
    """

    def __init__(self, upstream: str, latency_ms: float = 0.0, upstream_connections: int = 4, port: int = 0):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.latency_ms = latency_ms
        self.upstream_connections = upstream_connections
        self.faults: list[Fault] = []
        self._all_faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []
        self.max_upstream_seen = 0
        self.max_clients_seen = 0
        self._clients = 0
        self._active_upstream = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._port = port
        self._writers: set = set()
        self._thread = threading.Thread(target=self._run, name="gcs-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- test helpers --------------------------------------------------------------------------
    def add_fault(self, status: int, method: str | None = None, path: str | None = None, times: int | None = 1,
                  after: int = 0) -> Fault:
        f = Fault(status, method, path, times, after)
        with self._lock:
            self.faults.append(f)
            self._all_faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def reset(self) -> None:
        """No faults, no latency, empty log."""
        self.clear_faults()
        self.latency_ms = 0.0
        self.log.clear()
        self.max_upstream_seen = self.max_clients_seen = 0

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen (faulted ones included) with this method and a path matching the regex."""
        rx = re.compile(path) if path else None
        return sum(1 for m, p, _ in list(self.log) if (method is None or m == method) and (rx is None or rx.search(p)))

    def stats(self) -> dict:
        by_method: dict = {}
        for m, _, _ in list(self.log):
            by_method[m] = by_method.get(m, 0) + 1
        return {"requests": len(self.log), "by_method": by_method, "max_upstream": self.max_upstream_seen,
                "max_clients": self.max_clients_seen, "latency_ms": self.latency_ms,
                "faults": [repr(f) for f in self.faults]}

    def _control(self, method: str, what: str, body: bytes):
        """The control API ``RemoteProxy`` drives: JSON in, JSON out."""
        arg = json.loads(body) if body else {}
        if what == "stats":
            out = self.stats()
        elif what == "log":
            out = [list(e) for e in list(self.log)]
        elif what == "faults" and method == "POST":
            f = self.add_fault(**arg)
            out = {"id": self._all_faults.index(f)}
        elif what == "faults":  # every fault ever added, cleared ones too, so a handle keeps its counts
            out = [{"status": f.status, "seen": f.seen, "hits": f.hits} for f in list(self._all_faults)]
        elif what == "clear_faults":
            self.clear_faults()
            out = {}
        elif what == "reset":
            self.reset()
            out = {}
        elif what == "clear_log":
            self.log.clear()
            out = {}
        elif what == "latency":
            self.latency_ms = float(arg["ms"])
            out = {}
        else:
            return 404, "Not Found", [], b"unknown control path"
        return 200, "OK", [("Content-Type", "application/json")], json.dumps(out).encode()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(10)

    # -- the server ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._slots = asyncio.Semaphore(self.upstream_connections)
        server = await asyncio.start_server(self._client, HOST, self._port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop_event.wait()
            server.close()
            for w in list(self._writers):
                w.close()
            await asyncio.sleep(0.05)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        self._writers.add(writer)
        self.max_clients_seen = max(self.max_clients_seen, self._clients)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    break
                line, headers = head
                method, target, version = (line.split(" ", 2) + ["HTTP/1.0"])[:3]
                body = await _read_body(reader, headers, until_eof=False)
                status, reason, out_headers, out_body = await self._serve(method, target, headers, body)
                close = version == "HTTP/1.0" or any(k.lower() == "connection" and v.lower() == "close"
                                                     for k, v in headers)
                lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in out_headers]
                lines += [f"Content-Length: {len(out_body)}", "Connection: " + ("close" if close else "keep-alive")]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + out_body)
                await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            pass  # a client that goes away, or the proxy stopping: not an error (and a cancelled task is logged)
        finally:
            self._clients -= 1
            self._writers.discard(writer)
            writer.close()

    async def _serve(self, method: str, target: str, headers: list, body: bytes):
        decoded = urllib.parse.unquote(target)
        if decoded.startswith("/__proxy__/"):
            return self._control(method, decoded[len("/__proxy__/"):], body)
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        with self._lock:
            fault = next((f for f in self.faults if f.take(method, decoded)), None)
        if fault is not None:
            self.log.append((method, decoded, fault.status))
            msg = _MESSAGES.get(fault.status, "injected by the test proxy")
            doc = {"error": {"code": fault.status, "message": msg, "errors": [{"message": msg}]}}
            return fault.status, "Injected", [("Content-Type", "application/json")], json.dumps(doc).encode()
        if method == "DELETE" and decoded.startswith("/upload/") and "upload_id=" in decoded:
            # Cancelling a resumable upload (gcsfs does when a chunk fails): GCS answers 499, the emulator does
            # not implement it (501, which gcsfs would retry for 30 s and then report instead of the real error).
            self.log.append((method, decoded, 499))
            return 499, "Client Closed Request", [], b""
        async with self._slots:
            self._active_upstream += 1
            self.max_upstream_seen = max(self.max_upstream_seen, self._active_upstream)
            try:
                status, reason, out_headers, out_body = await self._forward(method, target, headers, body)
            finally:
                self._active_upstream -= 1
        self.log.append((method, decoded, status))
        return status, reason, out_headers, out_body

    async def _forward(self, method: str, target: str, headers: list, body: bytes):
        for attempt in range(50):  # the emulator's backlog is tiny; our own slots keep us under it, but be safe
            try:
                r, w = await asyncio.open_connection(*self.upstream)
                break
            except ConnectionError:
                await asyncio.sleep(0.01 * (attempt + 1))
        else:
            return 502, "Bad Gateway", [], b"emulator unreachable"
        try:
            # The client's Host header goes through unchanged: the emulator builds the resumable-upload URLs
            # it returns from it, and those must lead back here, not around the proxy.
            host = next((v for k, v in headers if k.lower() == "host"), f"{self.upstream[0]}:{self.upstream[1]}")
            lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
            lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP]
            if body or method in ("POST", "PUT", "PATCH"):
                lines.append(f"Content-Length: {len(body)}")
            lines.append("Connection: close")
            w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await w.drain()
            head = await _read_head(r)
            if head is None:
                return 502, "Bad Gateway", [], b"emulator closed the connection"
            status_line, resp_headers = head
            parts = status_line.split(" ", 2)
            status, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "")
            resp_body = await _read_body(r, resp_headers, until_eof=True)
            return status, reason, [(k, v) for k, v in resp_headers if k.lower() not in _HOP], resp_body
        finally:
            w.close()


class _RemoteLog:
    def __init__(self, proxy: "RemoteProxy"):
        self._proxy = proxy

    def clear(self) -> None:
        self._proxy._call("POST", "clear_log")

    def __iter__(self):
        return iter([tuple(e) for e in self._proxy._call("GET", "log")])

    def __len__(self) -> int:
        return len(self._proxy._call("GET", "log"))


class RemoteFault:
    """A fault installed in a proxy process; ``hits`` and ``seen`` are read from it when asked."""

    def __init__(self, proxy: "RemoteProxy", index: int, spec: dict):
        self._proxy, self._index, self.spec = proxy, index, spec

    def _state(self) -> dict:
        return self._proxy._call("GET", "faults")[self._index]

    @property
    def hits(self) -> int:
        return self._state()["hits"]

    @property
    def seen(self) -> int:
        return self._state()["seen"]

    def __repr__(self) -> str:
        return f"Fault({self.spec}, hits={self.hits})"


class RemoteProxy:
    """A :class:`Proxy` in its own process (``python tests/gcs_server.py --upstream ...``), driven over its
    control API with the same methods. Its own process, because a proxy thread in the test process stalls
    whenever that process's main thread blocks while holding the GIL or the garbage collector runs a
    DataLoader iterator's ``__del__`` on the proxy's thread (which waits for workers that are waiting on the
    proxy)."""

    def __init__(self, upstream: str, latency_ms: float = 0.0, upstream_connections: int = 4):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--upstream", upstream, "--latency-ms", str(latency_ms),
             "--upstream-connections", str(upstream_connections)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the GCS proxy process did not start")
        self.endpoint = json.loads(line)["STORAGE_EMULATOR_HOST"]
        self.log = _RemoteLog(self)

    def _call(self, method: str, what: str, arg: dict | None = None):
        status, body = _http(method, f"{self.endpoint}/__proxy__/{what}",
                             json.dumps(arg).encode() if arg is not None else (b"" if method == "POST" else None))
        if status != 200:
            raise RuntimeError(f"proxy control {what}: HTTP {status} {body[:200]!r}")
        return json.loads(body)

    def add_fault(self, status: int, method: str | None = None, path: str | None = None, times: int | None = 1,
                  after: int = 0) -> RemoteFault:
        spec = {"status": status, "method": method, "path": path, "times": times, "after": after}
        return RemoteFault(self, self._call("POST", "faults", spec)["id"], spec)

    def clear_faults(self) -> None:
        self._call("POST", "clear_faults")

    def reset(self) -> None:
        self._call("POST", "reset")

    @property
    def latency_ms(self) -> float:
        return self.stats()["latency_ms"]

    @latency_ms.setter
    def latency_ms(self, ms: float) -> None:
        self._call("POST", "latency", {"ms": ms})

    def stats(self) -> dict:
        return self._call("GET", "stats")

    @property
    def max_upstream_seen(self) -> int:
        return self.stats()["max_upstream"]

    @property
    def max_clients_seen(self) -> int:
        return self.stats()["max_clients"]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        rx = re.compile(path) if path else None
        return sum(1 for m, p, _ in self.log if (method is None or m == method) and (rx is None or rx.search(p)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


class GCS:
    """An emulator behind a proxy, with this process's environment pointing gcsfs at the proxy.

    ``env`` holds the variables a subprocess needs (they are also set in ``os.environ`` while active, so
    subprocesses and DataLoader workers inherit them).
    """

    def __init__(self, latency_ms: float = 0.0):
        self.emulator = Emulator()
        try:
            self.proxy = RemoteProxy(self.emulator.endpoint, latency_ms=latency_ms)
        except BaseException:
            self.emulator.stop()
            raise
        self.env = dict(GCS_ENV, STORAGE_EMULATOR_HOST=self.proxy.endpoint)
        self._saved_env: dict | None = None
        self._saved_conf: dict | None = None
        self.bucket = ""

    def activate(self) -> None:
        """Point this process (and its future children) at the proxy; gcsfs must not be imported yet, or must
        have been imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (mlc.io.storage sets that default)."""
        self._saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        gcsfs = sys.modules.get("gcsfs")
        if gcsfs is not None and gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
            raise RuntimeError("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set; "
                               "every call would wait on a gRPC probe. Import mlc.io.storage first.")
        import fsspec.config
        self._saved_conf = {p: dict(fsspec.config.conf.get(p, {})) for p in ("gs", "gcs")}
        for p in ("gs", "gcs"):
            fsspec.config.conf.setdefault(p, {})["token"] = "anon"

    def deactivate(self) -> None:
        if self._saved_env is not None:
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if self._saved_conf is not None:
            import fsspec.config
            for p, v in self._saved_conf.items():
                if v:
                    fsspec.config.conf[p] = v
                else:
                    fsspec.config.conf.pop(p, None)

    def new_bucket(self, prefix: str = "mlc-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.emulator.create_bucket(name)
        self.bucket = name
        return name

    def empty_bucket(self, bucket: str | None = None) -> None:
        """Delete every object in the bucket (frees the emulator's memory); errors are ignored."""
        b = bucket or self.bucket
        if not b:
            return
        try:
            import fsspec
            fs = fsspec.filesystem("gs", use_listings_cache=False)
            paths = fs.find(b)
            if paths:
                fs.rm(paths)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass

    def worker_env(self) -> dict:
        """Environment variables a worker process needs (e.g. Ray ``runtime_env={"env_vars": ...}`` for
        workers of a cluster started before this server): the gcsfs settings and this process's byte cache."""
        env = dict(self.env)
        for k in ("MLC_BYTE_CACHE",):
            if os.environ.get(k):
                env[k] = os.environ[k]
        return env

    def url(self, path: str = "", bucket: str | None = None) -> str:
        b = bucket or self.bucket
        return f"gs://{b}/{path.lstrip('/')}" if path else f"gs://{b}"

    def upload(self, local: str | Path, url: str) -> list[str]:
        """Copy a local folder's files (recursively) to ``url``; returns the object URLs written."""
        from mlc.io import storage
        local = Path(local)
        done = []
        for p in sorted(local.rglob("*")):
            if p.is_file():
                target = storage.join(url, p.relative_to(local).as_posix())
                storage.write_bytes(target, p.read_bytes())
                done.append(target)
        return done

    def stop(self) -> None:
        self.deactivate()
        self.proxy.stop()
        self.emulator.stop()


def main(argv=None) -> None:
    """Run an emulator behind a proxy until interrupted; prints the STORAGE_EMULATOR_HOST to use."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every request (default: 0)")
    p.add_argument("--upstream", help="proxy this emulator instead of starting one (http://host:port)")
    p.add_argument("--upstream-connections", type=int, default=4)
    args = p.parse_args(argv)
    emulator = None if args.upstream else Emulator()
    proxy = Proxy(args.upstream or emulator.endpoint, latency_ms=args.latency_ms,
                  upstream_connections=args.upstream_connections)
    print(json.dumps({"STORAGE_EMULATOR_HOST": proxy.endpoint,
                      "emulator": args.upstream or emulator.endpoint}), flush=True)
    import signal

    def _terminate(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _terminate)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        if emulator:
            emulator.stop()


if __name__ == "__main__":
    main()
