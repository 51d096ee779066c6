"""One writer per trace: a live run holds a lease, a small JSON object beside the trace.

``TRACE.lease.json`` names the run that writes ``TRACE`` (its token, trace run id,
host, pid) and a heartbeat the holder renews every ``ttl_s / 4`` seconds. A second
writer, ``overwrite=True`` included, is refused while the lease is live. A lease is
stale when its heartbeat is older than ``ttl_s`` or when its holder ran on this host
and its process is gone (a killed run can be resumed at once); a stale lease is
taken over, with a warning. On a local disk the first lease is created with an
exclusive create; on object storage without conditional writes a writer confirms
its lease by reading it back, which leaves a window of one round trip for two
writers that start at the same moment.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime
from typing import Any

import fsspec

from lightning_tracetrain.exceptions import TraceBusyError

TTL_S = 120.0


def lease_path(trace_path: str) -> str:
    """Where the lease of the trace at ``trace_path`` lives: beside it, not inside (creation replaces the trace)."""
    return f"{trace_path.rstrip('/')}.lease.json"


class Lease:
    """The right of one run to write the trace at ``trace_path``.

    Example:
        >>> lease = Lease("runs/trace")  # doctest: +SKIP
        >>> lease.acquire()  # raises TraceBusyError while another live run holds it  # doctest: +SKIP
        >>> lease.release()  # doctest: +SKIP
    """

    def __init__(self, trace_path: str, storage_options: dict[str, Any] | None = None, ttl_s: float = TTL_S) -> None:
        self.trace_path = str(trace_path)
        self.path = lease_path(self.trace_path)
        self.fs, self._key = fsspec.core.url_to_fs(self.path, **(storage_options or {}))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self.run_id: str | None = None
        self.lost = False  # another run took the lease over (we were thought stale)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life cycle

    def acquire(self) -> None:
        """Hold the lease (taking over a stale one), then renew it on a background thread."""
        holder = self._read()
        if holder is not None and holder.get("token") != self.token:
            why = self._stale(holder)
            if why is None:
                raise TraceBusyError(
                    f"Another run is writing the trace at {self.trace_path}: {_describe(holder)}. Two writers would "
                    "destroy each other's steps. Wait for it to finish, trace into another dirpath, or, if that run "
                    f"is gone, wait {self.ttl_s:.0f} s after its last heartbeat (or delete {self.path})."
                )
            warnings.warn(f"Taking over the lease of {self.path}: {_describe(holder)}, {why}.", stacklevel=3)
        self._write(exclusive=holder is None)
        if (mine := self._read()) is None or mine.get("token") != self.token:
            raise TraceBusyError(f"Another run took the lease of {self.path} at the same moment: {_describe(mine)}.")
        self._thread = threading.Thread(target=self._renew, name="trace-lease", daemon=True)
        self._thread.start()

    def set_run(self, run_id: str) -> None:
        """Record the trace's run id once the trace exists."""
        self.run_id = run_id
        self._write()

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder = self._read()
            if holder is not None and holder.get("token") == self.token:
                self.fs.rm_file(self._key)
        except OSError:
            pass  # a lease left behind goes stale by itself

    # ---- helpers

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                holder = self._read()
                if holder is None or holder.get("token") != self.token:
                    self.lost = True
                    return
                self._write()
            except OSError:
                continue  # a failed renewal is retried; the lease goes stale only after ttl_s

    def _stale(self, holder: dict[str, Any]) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > self.ttl_s:
            return f"whose last heartbeat was {age:.0f} s ago"
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return "whose process is gone"
        return None

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._key, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written lease of a store without atomic writes: treat as the holder's
            return {"token": None, "heartbeat": time.time(), "host": "?", "pid": -1}

    def _write(self, exclusive: bool = False) -> None:
        now = time.time()
        data = json.dumps(
            {
                "token": self.token,
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": now,
                "heartbeat_utc": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            }
        ).encode()
        if not self.local:
            self.fs.pipe_file(self._key, data)  # one PUT: readers see the old or the new lease
            return
        os.makedirs(os.path.dirname(self._key) or ".", exist_ok=True)
        if exclusive:
            try:  # the first lease: exactly one of two racing writers creates it
                fd = os.open(self._key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return  # the read-back in acquire() reports the winner
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        tmp = f"{self._key}.{self.token}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self._key)  # atomic: readers see the old or the new lease


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "no holder"
    age = time.time() - float(holder.get("heartbeat", 0.0))
    run = f"run {holder['run_id']}, " if holder.get("run_id") else ""
    return f"{run}pid {holder.get('pid')} on host {holder.get('host')}, last heartbeat {age:.0f} s ago"
