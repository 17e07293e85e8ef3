"""A stage lock that holds where work folders live on clusters: NFS and Lustre, across nodes.

`fcntl.flock` gives no exclusion across nodes on Lustre mounted with `localflock` and fails where it is
mounted without `flock`. Instead the lock is a file created atomically (`O_CREAT | O_EXCL`, atomic on
NFSv3+ and Lustre) that names its holder: host, pid, SLURM job. While held, a thread refreshes its
modification time (the heartbeat). Another process takes it over only when the holder is provably gone:
on the same host, its pid no longer runs; on another host, the heartbeat has not moved for `stale`
seconds of the waiter's own clock (no comparison of two machines' clocks).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HEARTBEAT = 30.0   # seconds between the holder's touches of the lock file
STALE = 600.0      # a holder on another host whose heartbeat stood still this long is gone
POLL = 1.0


def holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def read_holder(path: Path) -> dict | None:
    """The holder a lock file names, or None when there is no (complete) lock file."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _try_create(path: Path, text: str) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return True


def _break(path: Path, judged: str) -> None:
    """Remove a lock judged stale, unless it changed since it was judged (then another process holds a
    new one: it is put back)."""
    grave = path.with_name(f"{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(path, grave)  # atomic: of two breakers, one gets the file
    except FileNotFoundError:
        return
    if grave.read_text() != judged:
        try:
            os.link(grave, path)
        except FileExistsError:
            pass
    grave.unlink(missing_ok=True)


class _Watch:
    """What a waiter has seen of a lock file: its text and since when its heartbeat stood still."""

    def __init__(self):
        self.text, self.mtime, self.still_since = None, None, time.monotonic()

    def see(self, text: str, mtime: float) -> float:
        """Seconds the heartbeat has stood still, by this process's clock."""
        if (text, mtime) != (self.text, self.mtime):
            self.text, self.mtime, self.still_since = text, mtime, time.monotonic()
        return time.monotonic() - self.still_since


def _holder_gone(path: Path, watch: _Watch, stale: float) -> str | None:
    """The lock's text when its holder is provably gone, else None."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    holder = read_holder(path)
    if holder and holder.get("host") == socket.gethostname():
        return text if not alive_here(int(holder.get("pid", -1))) else None
    return text if watch.see(text, mtime) >= stale else None  # another host, or a torn record


@contextmanager
def held(path: Path, stale: float = STALE, heartbeat: float = HEARTBEAT, on_wait=None):
    """Hold the lock file `path` for the block (waiting for it; see the module docstring)."""
    record = json.dumps(holder_record()) + "\n"
    watch, told = _Watch(), False
    while not _try_create(path, record):
        gone = _holder_gone(path, watch, stale)
        if gone is not None:
            _break(path, gone)
            continue
        if not told and on_wait:
            on_wait(read_holder(path))
            told = True
        time.sleep(POLL)
    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat {path.name}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if read_text_or_none(path) == record:  # a lock taken over meanwhile is not ours to remove
            path.unlink()


def read_text_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
