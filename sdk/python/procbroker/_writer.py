"""The one writer of frames to the broker.

Any thread may send. Whoever finds nobody writing writes itself, everything
queued so far in one ``write`` (so a batch of replies costs one system
call), and keeps writing what others queue meanwhile. The pipe is
non-blocking: when it is full, a thread of the writer's own takes over and
waits for room, so no handler and, above all, not the thread that reads
stdin ever blocks on stdout (the broker reads a worker's stdout only while
that worker reads its stdin).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
import time
from typing import List

log = logging.getLogger("procbroker")

#: Frames queued past which a streaming handler waits before its next
#: partial reply (and below which it goes on).
HIGH_WATER = 1024
LOW_WATER = 512


class Writer:
    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label
        try:
            fifo = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            fifo = False
        # Only a pipe is made non-blocking: a terminal or file may be shared
        # with the shell that started us.
        if fifo:
            os.set_blocking(fd, False)
        self._lock = threading.Lock()
        self._out: List[bytes] = []
        self._busy = False
        self._broken = False
        self._handoff = False
        self._kick = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        self._thread: "threading.Thread | None" = None

    @property
    def depth(self) -> int:
        """Frames queued and not yet written."""
        return len(self._out)

    def send(self, frame: bytes) -> None:
        with self._lock:
            if self._broken:
                return
            self._out.append(frame)
            if self._busy:
                return
            self._busy = True
            items, self._out = self._out, []
        self._write(items)

    def send_many(self, frames: List[bytes]) -> None:
        with self._lock:
            if self._broken:
                return
            self._out.extend(frames)
            if self._busy:
                return
            self._busy = True
            items, self._out = self._out, []
        self._write(items)

    def _write(self, items: List[bytes]) -> None:
        """Writes ``items`` and whatever is queued meanwhile; hands over to
        the writer's thread when the pipe is full."""
        fd = self.fd
        while True:
            data = items[0] if len(items) == 1 else b"".join(items)
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._break(e)
                return
            if n < len(data):
                with self._lock:
                    self._out.insert(0, data[n:])
                    self._handoff = True
                    self._start_thread()
                    self._kick.notify()
                return
            with self._lock:
                if not self._out:
                    self._busy = False
                    if self._room_waiters:
                        self._room.notify_all()
                    return
                items, self._out = self._out, []

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="procbroker-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        fd = self.fd
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while True:
            with self._lock:
                while not self._handoff:
                    self._kick.wait()
                self._handoff = False
            while True:
                try:
                    poller.poll()  # until the pipe has room (or is closed)
                except OSError as e:
                    self._break(e)
                    break
                with self._lock:
                    if not self._out:
                        self._busy = False
                        if self._room_waiters:
                            self._room.notify_all()
                        break
                    items, self._out = self._out, []
                data = b"".join(items)
                try:
                    n = os.write(fd, data)
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    self._break(e)
                    break
                with self._lock:
                    if n < len(data):
                        self._out.insert(0, data[n:])
                    if self._room_waiters and len(self._out) < LOW_WATER:
                        self._room.notify_all()

    def _break(self, e: Exception) -> None:
        with self._lock:
            if not self._broken:
                if getattr(e, "errno", None) == errno.EPIPE:
                    log.warning("[%s] stdout is closed: nothing more is sent", self.label)
                else:
                    log.warning("[%s] cannot write to stdout: %s", self.label, e)
            self._broken = True
            self._out = []
            self._busy = False
            self._room.notify_all()

    def wait_room(self, cancelled) -> None:
        """Blocks while more than ``HIGH_WATER`` frames wait to be written,
        until they are fewer than ``LOW_WATER`` or ``cancelled()``."""
        with self._lock:
            if len(self._out) < HIGH_WATER:
                return
            self._room_waiters += 1
            try:
                while len(self._out) >= LOW_WATER and not self._broken and not cancelled():
                    self._room.wait(0.05)
            finally:
                self._room_waiters -= 1

    def flush(self, timeout: float) -> bool:
        """Waits until everything queued is written (True) or ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._broken or (not self._busy and not self._out):
                    return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.002)
