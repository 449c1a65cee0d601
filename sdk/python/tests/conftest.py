"""Test helpers: a child service driven over its real pipes, the test playing
the broker; and the broker binary for the tests that run under it."""

import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import pytest

HERE = Path(__file__).resolve().parent
SDK = HERE.parent
REPO = SDK.parent.parent
SUBJECT = SDK / "conformance" / "subject.py"

# The tests run against the installed package (`pip install ./sdk/python`);
# without one, against the checkout's copy, for the children too.
try:
    import procbroker
except ImportError:
    sys.path.insert(0, str(SDK))
    import procbroker
_EXTRA_PATH = str(SDK) if Path(procbroker.__file__).resolve().parent.parent == SDK else None


def child_env(extra=None):
    # The broker reads PROCBROKER_* variables as settings and refuses any it
    # does not know: PROCBROKER_BIN (which names it) is not one.
    env = {k: v for k, v in os.environ.items() if k != "PROCBROKER_BIN"}
    env["PYTHONUNBUFFERED"] = "1"
    if _EXTRA_PATH:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_EXTRA_PATH, os.environ.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def packb(value):
    return msgpack.packb(value, use_bin_type=True)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def value_end(data: bytes, pos: int) -> int:
    """Where the MessagePack value at `pos` ends (any depth; msgpack's own
    Unpacker stops at about 1000 levels)."""
    left = 1
    while left:
        m = data[pos]
        left -= 1
        if m <= 0x7F or m >= 0xE0 or m in (0xC0, 0xC2, 0xC3):
            pos += 1
        elif m <= 0x8F:
            left, pos = left + 2 * (m & 0x0F), pos + 1
        elif m <= 0x9F:
            left, pos = left + (m & 0x0F), pos + 1
        elif m <= 0xBF:
            pos += 1 + (m & 0x1F)
        elif m in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
            w = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[m]
            pos += 1 + w + int.from_bytes(data[pos + 1:pos + 1 + w], "big")
        elif m in (0xC7, 0xC8, 0xC9):
            w = {0xC7: 1, 0xC8: 2, 0xC9: 4}[m]
            pos += 2 + w + int.from_bytes(data[pos + 1:pos + 1 + w], "big")
        elif m in (0xDC, 0xDD, 0xDE, 0xDF):
            w = 2 if m in (0xDC, 0xDE) else 4
            n = int.from_bytes(data[pos + 1:pos + 1 + w], "big")
            left, pos = left + (2 * n if m >= 0xDE else n), pos + 1 + w
        else:
            pos += 1 + {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
                        0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}[m]
    assert pos <= len(data), "a value runs past the frame"
    return pos


class Frame:
    """One envelope the service wrote: its keys, and its payload's bytes."""

    def __init__(self, body: bytes):
        self.body = body
        self.env = {}
        self.raw_payload = None
        m = body[0]
        entries, pos = (m & 0x0F, 1) if 0x80 <= m <= 0x8F else (int.from_bytes(body[1:3], "big"), 3)
        assert 0x80 <= m <= 0x8F or m == 0xDE, f"not a map: {body[:20]!r}"
        for _ in range(entries):
            key_end = value_end(body, pos)
            end = value_end(body, key_end)
            key = msgpack.unpackb(body[pos:key_end], raw=False)
            if key == "payload":
                self.raw_payload = body[key_end:end]
            else:
                self.env[key] = msgpack.unpackb(body[key_end:end], raw=False, strict_map_key=False)
            pos = end
        assert pos == len(body), "trailing bytes after the envelope"

    def __getitem__(self, key):
        return self.env[key]

    def get(self, key, default=None):
        return self.env.get(key, default)

    @property
    def payload(self):
        if self.raw_payload is None:
            return None
        return msgpack.unpackb(self.raw_payload, raw=False, strict_map_key=False)

    @property
    def has_payload(self):
        return self.raw_payload is not None

    def __repr__(self):
        return f"Frame({self.env!r}, payload={self.raw_payload!r:.200})"


class Peer:
    """A service process with its stdin and stdout as pipes; the test is its
    broker. Frames it writes are parsed on a thread as they come."""

    def __init__(self, args, env=None, process_id="subject.0"):
        full_env = child_env({"PROCBROKER_PROCESS_ID": process_id,
                              "PROCBROKER_SERVICE": process_id.split(".")[0], **(env or {})})
        self.stderr_file = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr_file, env=full_env)
        self.id = process_id
        self.frames: "queue.Queue" = queue.Queue()
        self.stdout_error = None
        self.stdout_bytes = 0
        self._next_cid = 1000
        self.reading = threading.Event()  # cleared: stdout is left unread
        self.reading.set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self.recv(10)
        assert (self.ready["type"], self.ready["id"], self.ready["target"]) == ("event", "ready", "broker"), self.ready

    def _read(self):
        out = self.proc.stdout
        try:
            while True:
                self.reading.wait()
                head = out.read(4)
                if not head:
                    break
                if len(head) < 4:
                    self.stdout_error = f"stdout ended inside a length ({head!r})"
                    break
                (n,) = struct.unpack(">I", head)
                body = out.read(n)
                self.stdout_bytes += 4 + len(body)
                if len(body) < n:
                    self.stdout_error = f"stdout ended inside a frame ({len(body)} of {n} bytes)"
                    break
                self.frames.put(Frame(body))
        except Exception as e:  # not frames: the test fails on it
            self.stdout_error = f"stdout is not frames: {e!r}"
        finally:
            self.frames.put(None)

    # --- writing ---

    def write(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, envelope: dict, payload_first=False):
        """Sends an envelope, `payload` last as the broker writes it (or
        first: any order is valid)."""
        env = dict(envelope)
        if "payload" in env:
            p = env.pop("payload")
            env = {"payload": p, **env} if payload_first else {**env, "payload": p}
        self.write(frame(packb(env)))

    def cid(self):
        self._next_cid += 1
        return self._next_cid

    def request(self, method, payload=..., source="client.0", cid=None, **extra):
        """Sends a request; returns its correlation id."""
        cid = self.cid() if cid is None else cid
        env = {"type": "request", "id": method, "correlation_id": cid, "source": source, "target": self.id}
        env.update(extra)
        if payload is not ...:
            env["payload"] = payload
        self.send(env)
        return cid

    def event(self, name, payload=..., source="broker", **extra):
        env = {"type": "event", "id": name, "source": source, "target": self.id}
        env.update(extra)
        if payload is not ...:
            env["payload"] = payload
        self.send(env)

    def cancel(self, cid, source="client.0", reason="timeout"):
        self.event("cancel", {"source": source, "reason": reason}, correlation_id=cid)

    def close_stdin(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    # --- reading ---

    def recv(self, timeout=5.0) -> Frame:
        try:
            f = self.frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame within {timeout} s; stderr:\n{self.stderr()}") from None
        if f is None:
            self.frames.put(None)
            raise AssertionError(f"stdout closed ({self.stdout_error or 'EOF'}); stderr:\n{self.stderr()}")
        return f

    def call(self, method, payload=..., timeout=5.0, **extra) -> Frame:
        """A request and its reply (no other frame may come between)."""
        cid = self.request(method, payload, **extra)
        reply = self.recv(timeout)
        assert reply["correlation_id"] == cid, reply
        return reply

    def no_frame(self, within=0.3):
        try:
            f = self.frames.get(timeout=within)
        except queue.Empty:
            return
        if f is None:  # stdout closed: no frame came
            self.frames.put(None)
            return
        raise AssertionError(f"unexpected frame {f!r}")

    def wait_exit(self, timeout=5.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def subject():
    peers = []

    def start(**kw):
        p = Peer([sys.executable, str(SUBJECT)], **kw)
        peers.append(p)
        return p

    yield start
    for p in peers:
        p.kill()


@pytest.fixture
def service(tmp_path):
    """Starts a service from source text (dedented) written to a file."""
    peers = []

    def start(source, **kw):
        path = tmp_path / f"service{len(peers)}.py"
        path.write_text(textwrap.dedent(source))
        p = Peer([sys.executable, str(path)], **kw)
        peers.append(p)
        return p

    yield start
    for p in peers:
        p.kill()


def broker_bin() -> str:
    """The broker: $PROCBROKER_BIN, else this checkout's release or debug
    build. A test that needs it fails (never skips) without one."""
    explicit = os.environ.get("PROCBROKER_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            pytest.fail(f"PROCBROKER_BIN={explicit} is not an executable file")
        return explicit
    for build in ("release", "debug"):
        candidate = REPO / "target" / build / "procbroker"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("no procbroker binary: set PROCBROKER_BIN, or build one (cargo build --release) "
                f"so that {REPO}/target/release/procbroker exists")


class Broker:
    """`procbroker run --config FILE` with its own config, stopped by
    SIGTERM at the end."""

    def __init__(self, config_text: str, workdir: Path):
        self.config = workdir / "procbroker.toml"
        self.config.write_text(config_text)
        self.log = open(workdir / "broker.log", "w+b")
        env = child_env()
        self.proc = subprocess.Popen([broker_bin(), "run", "--config", str(self.config)],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=workdir)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout=20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the broker did not stop within {timeout} s:\n{self.output()}") from None


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")
