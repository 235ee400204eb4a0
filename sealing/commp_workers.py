"""Child processes that hash whole CommP subtrees, for `commp.CommPHasher(workers=N)`.

Plain `python -c` children rather than multiprocessing: no fork of a possibly threaded host,
and no re-import of the host's `__main__`, so it works from any script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from contextlib import suppress
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from subprocess import PIPE
from typing import IO, Any

from .commp import NODE_SIZE, subtree_root


class Workers:
    """Child interpreters that hash whole subtrees; roots come back in submission order.

    Plain `python -c` children rather than multiprocessing: no fork of a possibly threaded
    host, and no re-import of the host's `__main__`, so it works from any script. Data goes
    through one shared-memory block (pickling it through a pipe cost the parent as much
    CPU as a worker), or the workers read the file themselves.
    """

    def __init__(self, count: int, chunk: int) -> None:
        self._chunk = chunk
        self._slots = 2 * count  # each worker hashes one subtree while the next one waits
        self._shm: SharedMemory | None = None
        self.pending: deque[int] = deque()  # the worker of each task not yet collected
        self._sent = 0
        code = (
            "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
            f"from {__name__} import _worker_main; _worker_main()"
        )
        argv = [sys.executable, "-c", code, json.dumps(sys.path)]
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(count):
                self._procs.append(subprocess.Popen(argv, stdin=PIPE, stdout=PIPE))
        except BaseException:
            self.close()
            raise

    def submit_data(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Hash `data` (one chunk) in a worker; returns the oldest root if it had to wait."""
        root = self.result() if len(self.pending) >= self._slots else None
        if self._shm is None:
            self._shm = SharedMemory(create=True, size=self._slots * self._chunk)
        # Task n uses slot n % slots, last used by task n - slots, collected just above.
        offset = self._sent % self._slots * self._chunk
        buf = self._shm.buf
        assert buf is not None
        buf[offset : offset + len(data)] = data
        self._send({"shm": self._shm.name, "offset": offset, "length": len(data)})
        return root

    def submit_file(self, path: str, offset: int) -> bytes | None:
        """Hash the file's chunk at `offset` in a worker; returns the oldest root if it waited."""
        root = self.result() if len(self.pending) >= self._slots else None
        self._send({"path": path, "offset": offset, "length": self._chunk})
        return root

    def _send(self, request: dict[str, Any]) -> None:
        proc = self._procs[self._sent % len(self._procs)]
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"CommP worker process exited with code {proc.wait()}") from None
        self.pending.append(self._sent % len(self._procs))
        self._sent += 1

    def result(self) -> bytes:
        """The root of the oldest task not yet collected (blocks until it is done)."""
        # Each worker answers in the order it was asked, and tasks went round-robin, so the
        # oldest task's answer is the next 32 bytes from its worker.
        proc = self._procs[self.pending.popleft()]
        assert proc.stdout is not None
        root = proc.stdout.read(NODE_SIZE)
        if len(root) != NODE_SIZE:
            raise RuntimeError(f"CommP worker process exited with code {proc.wait()}")
        return root

    def close(self) -> None:
        """Stop the workers (at once if they still have work: it is abandoned) and free memory."""
        for proc in self._procs:
            if self.pending:
                proc.kill()
            with suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()  # EOF: the worker exits
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs = []
        self.pending.clear()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None


def _worker_main() -> None:
    """Body of a worker process: hash the subtree of each request line, write its root."""
    shm: SharedMemory | None = None
    files: dict[str, IO[bytes]] = {}
    out = sys.stdout.buffer
    try:
        for line in sys.stdin.buffer:
            req = json.loads(line)
            offset, length = req["offset"], req["length"]
            if "shm" in req:
                if shm is None:
                    shm = SharedMemory(name=req["shm"])
                    if os.name == "posix":
                        # The parent owns (and unlinks) the block; without this, this
                        # process's resource tracker would unlink it when the worker exits.
                        resource_tracker.unregister(getattr(shm, "_name", ""), "shared_memory")
                assert shm.buf is not None
                view = shm.buf[offset : offset + length]
                try:
                    root = subtree_root(view)
                finally:
                    view.release()
            else:
                f = files.get(req["path"])
                if f is None:
                    f = files[req["path"]] = open(req["path"], "rb")  # noqa: SIM115
                f.seek(offset)
                data = f.read(length)
                if len(data) != length:
                    raise RuntimeError(f"{req['path']} shrank while its CommP was computed")
                root = subtree_root(data)
            out.write(root)
            out.flush()
    finally:
        for f in files.values():
            f.close()
        if shm is not None:
            shm.close()
