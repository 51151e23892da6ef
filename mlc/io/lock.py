"""One writer per output folder: a lock object in the folder that a second run on it finds.

Two runs on one ``--output`` (or one ``--name``, or one sweep) would overwrite each other's files while
each reports its own result. The first run writes ``.mlc-lock.json`` (host, pid, start time, command, a
random token) with a create-only write: ``O_CREAT | O_EXCL`` on a local disk, ``ifGenerationMatch=0`` on
GCS (gcsfs ``mode="create"``), so of two runs that start at once exactly one gets it. A second run fails at
once with :class:`OutputLocked`, naming the holder and what to do.

A lock outlives its holder when the process is killed (SIGKILL, a lost node), so a stale one is taken over:
on the holder's own host when its pid is gone (or now belongs to another process: the start time differs);
from any other host when the holder has not renewed it for ``lease_s`` (it renews every ``lease_s / 5``).
Taking over is conditional too (a local rename that only one run wins; a GCS delete on the generation that
was read), so two runs that both find a stale lock do not both proceed.

A process may hold a folder's lock more than once (a sweep predicts into its own folder): nested holds
share it and the outermost release removes it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid

from mlc.io import storage

LOCK_NAME = ".mlc-lock.json"
# A holder renews its lock every LEASE_S / 5; one not renewed for LEASE_S has lost its process or machine. Five
# minutes: a rerun after a lost Spot head waits at most that long, and a renewal may be late by minutes (a
# slow bucket, a stalled process) before another host would wrongly take the folder over.
LEASE_S = 300.0

_held: dict = {}  # folder URL -> [OutputLock, depth]: this process's locks
_held_guard = threading.Lock()


# What os.link raises on a filesystem without hard links.
NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class OutputLocked(storage.StorageError):
    """Another run holds the output folder."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from its first owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started_ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now = _process_start(pid)
    return started_ticks is None or now is None or now == started_ticks


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"{holder.get('what', 'a run')} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {started}: {holder.get('command', '?')}")


class OutputLock:
    """``with OutputLock(url): ...`` holds ``url``'s lock for the block (see the module's docstring)."""

    def __init__(self, folder: str, *, what: str = "a run", lease_s: float = LEASE_S, log=print):
        self.folder = str(folder).rstrip("/")
        self.url = storage.join(self.folder, LOCK_NAME)
        self.lease_s, self.log = lease_s, log
        self.local = storage.is_local(self.folder)
        self.mine = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
                     "pid_started": _process_start(os.getpid()), "started": time.time(),
                     "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
                     "lease_s": lease_s, "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._created_folder = False

    # -- reading and writing the lock object -------------------------------------------------------------
    def _read(self) -> dict | None:
        try:
            data = storage.read_bytes(self.url)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}  # unreadable: not a lock any run of ours wrote whole; treated as stale

    def _payload(self) -> bytes:
        return json.dumps(dict(self.mine, renewed=time.time()), indent=1).encode()

    def _create(self) -> bool:
        """Write the lock only if there is none; False when another run's appeared first."""
        if self.local:
            _, path = storage.filesystem(self.url)
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):
                os.makedirs(folder, exist_ok=True)
                self._created_folder = True
            # Written whole under a private name, then linked to the lock's (create-only, atomic): a racer never
            # reads a lock still being written, which it would take for an unreadable, stale one and take over.
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lock-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self._payload())
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~storage.umask())
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in NO_LINKS:
                    raise
                return self._create_exclusive(path)
            finally:
                os.unlink(tmp)
            return True
        fs, path = storage.filesystem(self.url)
        if fs.exists(path):  # what a store that ignores the precondition below (an emulator) still gets right
            return False
        try:
            fs.pipe_file(path, self._payload(), mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a filesystem without create-only writes
            storage.write_bytes(self.url, self._payload())
        # Read back: on a store that could not refuse the write, the last writer's token is what counts.
        return (self._read() or {}).get("token") == self.mine["token"]

    def _create_exclusive(self, path: str) -> bool:
        """Create-only without a hard link (a FUSE or SMB mount that has none): a racer could read the lock half
        written and take it for a stale one, a narrower window than no create-only write at all."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
        return True

    def _remove_stale(self, seen: dict) -> bool:
        """Remove the stale lock ``seen`` if it is still the one there; True when this run removed it."""
        if self.local:
            _, path = storage.filesystem(self.url)
            aside = f"{path}.stale-{self.mine['token']}"
            try:
                os.rename(path, aside)  # of two runs renaming the same lock, one finds it gone
            except FileNotFoundError:
                return False
            try:
                with open(aside, "rb") as f:
                    moved = json.loads(f.read() or b"{}")
            except ValueError:
                moved = {}
            if moved.get("token") != seen.get("token"):  # a fresh lock landed in between: put it back
                try:
                    os.link(aside, path)
                except OSError:
                    pass
                os.unlink(aside)
                return False
            os.unlink(aside)
            return True
        fs, path = storage.filesystem(self.url)
        try:
            generation = fs.info(path).get("generation")
        except FileNotFoundError:
            return False
        if (self._read() or {}).get("token") != seen.get("token"):
            return False
        try:
            if generation is not None and hasattr(fs, "split_path"):  # GCS: delete that generation only
                bucket, key, _ = fs.split_path(path)
                fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
                fs.invalidate_cache(path)
            else:
                fs.rm(path)
        except FileNotFoundError:
            return False
        return True

    def _stale_because(self, holder: dict) -> str | None:
        if not holder.get("token"):
            return "it is unreadable"
        if holder.get("host") == self.mine["host"] and isinstance(holder.get("pid"), int):
            if not _alive(holder["pid"], holder.get("pid_started")):
                return f"its process {holder['pid']} on this host has ended"
            return None
        lease = float(holder.get("lease_s") or LEASE_S)
        age = time.time() - float(holder.get("renewed") or holder.get("started") or 0)
        if age > lease:
            return f"its holder on {holder.get('host')} has not renewed it for {age:.0f} s (lease {lease:.0f} s)"
        return None

    # -- holding -------------------------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        with _held_guard:
            entry = _held.get(self.folder)
            if entry is not None:
                entry[1] += 1
                return entry[0]
        for _ in range(5):
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released in between: try again
            reason = self._stale_because(holder)
            if reason is None:
                raise OutputLocked(
                    f"{storage.safe_url(self.folder)} is in use by {describe(holder)}. Wait for that run to finish "
                    f"or stop it, or choose another --output/--name. If it is gone (its machine lost), its lock "
                    f"lapses {float(holder.get('lease_s') or LEASE_S):.0f} s after its last renewal; or remove "
                    f"{storage.safe_url(self.url)} once you are sure no run writes there.")
            if self._remove_stale(holder):
                self.log(f"warning: taking over {storage.safe_url(self.folder)} from a run that no longer holds it "
                         f"({reason}): {describe(holder)}")
        else:
            raise OutputLocked(f"{storage.safe_url(self.url)}: could not take the output folder's lock (other runs "
                               "keep taking it); try again")
        with _held_guard:
            _held[self.folder] = [self, 1]
        self._renewer = threading.Thread(target=self._renew, name="mlc-output-lock", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 5):
            try:
                holder = self._read()
                if (holder or {}).get("token") != self.mine["token"]:
                    self.log(f"warning: {storage.safe_url(self.url)} is no longer this run's "
                             f"({describe(holder) if holder else 'removed'}); another run may write here")
                    return
                storage.write_bytes(self.url, self._payload())
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; the run goes on
                self.log(f"warning: could not renew {storage.safe_url(self.url)}: {e}")

    def release(self) -> None:
        with _held_guard:
            entry = _held.get(self.folder)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[self.folder]
        owner = entry[0]
        owner._stop.set()
        try:
            if (owner._read() or {}).get("token") == owner.mine["token"]:
                storage.remove(owner.url)
            if owner.local and owner._created_folder:
                _, path = storage.filesystem(owner.folder)
                try:
                    os.rmdir(path)  # a run that wrote nothing leaves no empty folder behind
                except OSError:
                    pass
        except Exception as e:  # noqa: BLE001 - the run's result stands; a left lock is taken over later
            owner.log(f"warning: could not remove {storage.safe_url(owner.url)}: {e}")

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(folder: str, *, what: str = "a run", log=print) -> OutputLock:
    """``with hold(output): ...``: this run is the folder's one writer for the block."""
    return OutputLock(folder, what=what, log=log)
