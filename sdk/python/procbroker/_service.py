"""The service: handlers, the serve loop, calls out and events."""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import os
import queue
import select
import sys
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import _wire
from ._context import Context, EventContext, current
from ._wire import Raw, decode_value, encode_value
from ._writer import HIGH_WATER, LOW_WATER, Writer

log = logging.getLogger("procbroker")

_monotonic = time.monotonic
_U64_MAX = _wire.U64_MAX
_NOT_DECODED = _wire.NOT_DECODED
_response = _wire.response

#: A call's deadline when neither the caller nor the request it serves set one.
DEFAULT_CALL_TIMEOUT = 30.0
#: How much longer than its deadline a call waits for the broker's
#: ``timeout`` reply before giving up on its own.
CALL_GRACE = 1.0
#: After EOF on stdin, how long running handlers may take to finish.
EOF_GRACE = 0.25
#: Partial replies a stream holds unread before it is cut (cancelled, and
#: ended with ``busy``): the reader must keep up.
STREAM_BUFFER = 1000
#: The longest routing key, in UTF-8 bytes.
MAX_KEY_BYTES = 256

PROCESS_ID_ENV = "PROCBROKER_PROCESS_ID"
BROKER = "broker"


class CallError(Exception):
    """A failed request: raised by calls (the error reply's ``code`` and
    ``message``), and raised by a handler to choose its error reply's code.
    ``source`` is the process that answered, when known."""

    def __init__(self, code: str, message: str = "", source: Optional[str] = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.source = source

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return f"CallError({self.code!r}, {self.message!r})"


class Final:
    """Yielded last by an async generator handler: its value is the final
    reply's payload (an async generator cannot ``return`` a value)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


# Handler kinds.
_INLINE, _SYNC, _GEN, _ASYNC, _AGEN = range(5)


class _Handler:
    __slots__ = ("fn", "kind", "raw", "ctx", "name")

    def __init__(self, fn: Callable, kind: int, raw: bool, ctx: bool, name: str) -> None:
        self.fn, self.kind, self.raw, self.ctx, self.name = fn, kind, raw, ctx, name


def _takes_ctx(fn: Callable) -> bool:
    """Whether ``fn`` takes a second positional argument (the context)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


def _kind_of(fn: Callable, inline: bool, what: str) -> int:
    if inspect.isasyncgenfunction(fn):
        kind = _AGEN
    elif inspect.iscoroutinefunction(fn):
        kind = _ASYNC
    elif inspect.isgeneratorfunction(fn):
        kind = _GEN
    else:
        kind = _INLINE if inline else _SYNC
    if inline and kind != _INLINE:
        raise TypeError(f"{what}: only a plain function can be inline")
    return kind


class _Pool:
    """Daemon threads for sync handlers, up to ``max_workers`` (daemons: a
    handler still running cannot hold the process past EOF).

    Jobs are submitted by the one thread that reads stdin. Another thread
    is started whenever a job, once queued, is not taken at once (no thread
    was free for it): a handler that blocks never keeps the next job
    waiting while the pool may grow. No lock is taken per job."""

    def __init__(self, max_workers: int) -> None:
        self.max = max_workers
        self._q: "queue.SimpleQueue[Tuple[Callable, tuple]]" = queue.SimpleQueue()
        self._threads = 0

    def submit(self, fn: Callable, *args: Any) -> None:
        q = self._q
        q.put((fn, args))
        if self._threads < self.max and q.qsize() > 0:
            self._threads += 1
            threading.Thread(target=self._work, name=f"procbroker-{self._threads}", daemon=True).start()

    def _work(self) -> None:
        get = self._q.get
        while True:
            fn, args = get()
            try:
                fn(*args)
            except BaseException:  # the job logs its own failures
                log.exception("procbroker: a pool job failed")


# --- calls waiting for their replies -----------------------------------------

# What a waiter is handed: ("response" | "error", header, (payload bytes,
# payload decoded or NOT_DECODED)), or ("abort", code, message) when the
# call ends without a reply.
_Outcome = Tuple[str, Any, Any]


def _outcome_value(outcome: _Outcome, raw: bool) -> Any:
    kind, head, payload = outcome
    if kind == "response":
        data, value = payload
        if raw:
            return Raw(data)
        if value is _NOT_DECODED:
            return decode_value(data)
        return value
    if kind == "error":
        code = head.get("code")
        message = head.get("error")
        raise CallError(code if type(code) is str and code else "internal",
                        message if type(message) is str else "", head.get("source"))
    raise CallError(head, payload)


class _SyncCall:
    """A blocking call: the reader thread hands over the outcome and
    releases the lock the caller waits on."""

    __slots__ = ("lock", "outcome")
    stream = False

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.outcome: Optional[_Outcome] = None

    def finish(self, outcome: _Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            try:
                self.lock.release()
            except RuntimeError:  # a racing outcome released it first
                pass


class _AsyncCall:
    __slots__ = ("loop", "fut")
    stream = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fut: asyncio.Future = loop.create_future()


class _SyncStreamState:
    """A blocking stream's partial replies and final outcome."""

    __slots__ = ("cond", "items", "final")
    stream = True

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.items: Deque[bytes] = collections.deque()
        self.final: Optional[_Outcome] = None


class _AsyncStreamState:
    __slots__ = ("loop", "items", "final", "wake")
    stream = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: Deque[Optional[bytes]] = collections.deque()
        self.final: Optional[_Outcome] = None
        self.wake: Optional[asyncio.Future] = None


def _set_future(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _wake_async_stream(state: _AsyncStreamState) -> None:
    wake = state.wake
    if wake is not None and not wake.done():
        wake.set_result(None)


class Service:
    """A procbroker service: register handlers, then ``run()``.

    ``max_workers`` bounds the threads that run sync handlers (at least 16
    are always allowed). ``process_id`` defaults to ``PROCBROKER_PROCESS_ID``.
    ``input_fd``/``output_fd`` serve other descriptors than stdin/stdout
    (tests, embedding); by default ``run()`` takes stdin and stdout for the
    frames and points file descriptor 1 and ``sys.stdout`` at stderr, so a
    stray ``print`` (or a child process) cannot break the stream.
    """

    def __init__(self, max_workers: int = 32, *, process_id: Optional[str] = None,
                 max_frame_bytes: int = _wire.DEFAULT_MAX_FRAME_BYTES,
                 input_fd: Optional[int] = None, output_fd: Optional[int] = None) -> None:
        self._max_workers = max(16, int(max_workers))
        self._process_id = process_id or os.environ.get(PROCESS_ID_ENV) or "standalone"
        self._max_frame = int(max_frame_bytes)
        self._input_fd = input_fd
        self._output_fd = output_fd
        self._methods: Dict[str, _Handler] = {}
        self._events: Dict[str, _Handler] = {}
        self._pool = _Pool(self._max_workers)
        self._writer: Optional[Writer] = None
        self._lock = threading.Lock()
        # The requests whose handlers run, by (source, correlation id): what
        # a cancel names; their number is what a drain waits for. Only the
        # reading thread adds; a handler's thread removes its own.
        self._running: Dict[Tuple[str, int], Context] = {}
        self._pending: Dict[int, Any] = {}
        self._cids = itertools.count(1)
        self._draining = False
        self._stopping = False  # no new calls (shutdown from the broker)
        self._deaf = False  # stdin closed: no reply can come
        self._wake_r: Optional[int] = None
        self._wake_w: Optional[int] = None
        self._reader_ident: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_ident: Optional[int] = None
        self._loop_lock = threading.Lock()
        self._out: List[bytes] = []  # the reader's own frames of this batch
        self._loop_out: List[bytes] = []  # replies made on the event loop, this turn
        self._deferred: Dict[asyncio.AbstractEventLoop, List[Tuple[Callable, tuple]]] = {}
        self._served = False

    # --- registration --------------------------------------------------------

    def method(self, name: str, *, inline: bool = False, raw: bool = False) -> Callable:
        """Registers the decorated function as the handler of ``name``.

        ``fn(payload, ctx)`` (or ``fn(payload)``) returns the reply's
        payload: any MessagePack value, or ``Raw`` bytes sent verbatim. A
        plain function runs on the thread pool, an ``async def`` on the
        service's event loop; a generator (or async generator) streams: each
        value it yields is a partial reply when the caller asked for a
        stream (and is dropped otherwise), and what it returns is the final
        reply's payload. Raising ``CallError(code, message)`` replies that
        error; any other exception replies code ``handler``.

        ``raw=True``: ``payload`` is the request's MessagePack bytes (or
        None), not decoded, and ``bytes`` returned or yielded are sent as
        they are (None: no payload; other values are encoded as usual).
        ``inline=True`` (plain functions only): the
        handler runs on the thread that reads stdin, with no hand-off to
        the pool; for handlers that answer at once and never block (no
        sleep, no I/O, no calls).
        """
        def register(fn: Callable) -> Callable:
            kind = _kind_of(fn, inline, f"method {name!r}")
            self._methods[name] = _Handler(fn, kind, raw, _takes_ctx(fn), name)
            return fn

        if not isinstance(name, str) or not name:
            raise TypeError("a method name is a non-empty str")
        return register

    def event(self, name: str, *, inline: bool = False, raw: bool = False) -> Callable:
        """Registers the decorated function as the handler of event
        ``name``: ``fn(payload, ctx)`` with ``ctx.source``, ``ctx.method``
        (the event's name) and ``ctx.raw_payload``. It runs where a method
        handler of its kind would; ``inline=True`` keeps events in the order
        they came (each handled before the next frame is read)."""
        def register(fn: Callable) -> Callable:
            kind = _kind_of(fn, inline, f"event {name!r}")
            if kind in (_GEN, _AGEN):
                raise TypeError(f"event {name!r}: an event handler cannot be a generator")
            self._events[name] = _Handler(fn, kind, raw, _takes_ctx(fn), name)
            return fn

        if not isinstance(name, str) or not name:
            raise TypeError("an event name is a non-empty str")
        return register

    @property
    def process_id(self) -> str:
        """This process's id (``PROCBROKER_PROCESS_ID``)."""
        return self._process_id

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that runs ``async def`` handlers (started on
        first use, on a thread of its own)."""
        return self._ensure_loop()

    # --- serving -------------------------------------------------------------

    def run(self, main: Optional[Callable[["Service"], Any]] = None) -> None:
        """Serves until stdin ends (or, after ``shutdown`` from the broker,
        until the requests in flight are answered).

        Sends ``ready`` first; then ``main(svc)``, if given, runs on a
        thread of its own (an ``async def`` main on the event loop); the
        service keeps serving after it returns. At the end of stdin, running
        handlers are cancelled (reason ``shutting_down``) and get a moment
        to reply; a process whose handlers are still running then exits at
        once, as EOF asks. Raises ``FrameError`` if stdin stops being a
        stream of frames (a length over the limit, EOF inside a frame).
        """
        if self._served:
            raise RuntimeError("a Service runs once")
        self._served = True
        in_fd, out_fd, own_stdio = self._claim_stdio()
        self._writer = Writer(out_fd, self._process_id)
        self._reader_ident = threading.get_ident()
        if any(h.kind in (_ASYNC, _AGEN) for h in (*self._methods.values(), *self._events.values())):
            self._ensure_loop()
        self._writer.send(_wire.event(BROKER, "ready", None))
        if main is not None:
            self._start_main(main)
        failure: Optional[_wire.FrameError] = None
        drained = False
        try:
            drained = self._read_loop(in_fd)
        except _wire.FrameError as e:
            log.error("[%s] stdin is out of sync: %s", self._process_id, e)
            failure = e
        finally:
            self._flush_reader_batch()
        left = self._finish(drained)
        if left and own_stdio:
            log.warning("[%s] exiting with %d handler(s) still running", self._process_id, left)
            _flush_std()
            os._exit(1 if failure else 0)
        if failure is not None:
            raise failure

    def _claim_stdio(self) -> Tuple[int, int, bool]:
        if self._input_fd is not None or self._output_fd is not None:
            in_fd = self._input_fd if self._input_fd is not None else 0
            out_fd = self._output_fd if self._output_fd is not None else 1
            return in_fd, out_fd, False
        # Frames get private copies of stdin and stdout; fd 0 becomes
        # /dev/null and fd 1 stderr, so neither print() nor a child process
        # can write into (or read from) the frame stream.
        try:
            sys.stdout.flush()
        except Exception:
            pass
        out_fd = os.dup(1)
        in_fd = os.dup(0)
        os.dup2(2, 1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        try:
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except Exception:
            pass
        return in_fd, out_fd, True

    def _start_main(self, main: Callable) -> None:
        if inspect.iscoroutinefunction(main):
            loop = self._ensure_loop()

            async def run_main() -> None:
                try:
                    await main(self)
                except Exception:
                    log.exception("[%s] main failed", self._process_id)

            loop.call_soon_threadsafe(lambda: loop.create_task(run_main()))
            return

        def run_main_thread() -> None:
            try:
                main(self)
            except Exception:
                log.exception("[%s] main failed", self._process_id)

        threading.Thread(target=run_main_thread, name="procbroker-main", daemon=True).start()

    def _read_loop(self, in_fd: int) -> bool:
        """Reads and dispatches until EOF (False) or drained after
        ``shutdown`` (True)."""
        reader = _wire.FrameReader(in_fd, self._max_frame)
        decode = _wire.decode_envelope
        bad_envelope = _wire.BadEnvelope
        on_request = self._on_request
        poller = None
        while True:
            if self._draining:
                if not self._running:
                    return True
                if poller is None:
                    # Wait for stdin or for the last handler to finish.
                    poller = select.poll()
                    poller.register(in_fd, select.POLLIN)
                    poller.register(self._wake_r, select.POLLIN)  # type: ignore[arg-type]
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)  # type: ignore[arg-type]
                if in_fd not in ready:
                    continue
            frames = reader.read()
            if frames is None:
                return False
            now = _monotonic()
            for body in frames:
                try:
                    head, raw, value = decode(body)
                    if head.get("type") == "request":
                        on_request(head, raw, value, now)
                    else:
                        self._on_other(head, raw, value)
                except bad_envelope as e:
                    log.warning("[%s] skipping a bad frame: %s", self._process_id, e)
                except Exception:  # a bug of ours must not stop the service
                    log.exception("[%s] a frame could not be handled", self._process_id)
            self._flush_reader_batch()

    def _flush_reader_batch(self) -> None:
        if self._out:
            out, self._out = self._out, []
            self._writer.send_many(out)  # type: ignore[union-attr]
        if self._deferred:
            deferred, self._deferred = self._deferred, {}
            for loop, jobs in deferred.items():
                try:
                    loop.call_soon_threadsafe(_run_jobs, jobs)
                except RuntimeError:  # that loop is closed
                    pass

    def _finish(self, drained: bool) -> int:
        """After the loop: calls fail, handlers are told, output is flushed.
        Returns how many handlers are still running."""
        self._deaf = True
        self._stopping = True
        pending, self._pending = self._pending, {}
        for w in pending.values():
            self._abort_waiter(w, "closed", "stdin closed: no reply can come")
        self._flush_reader_batch()
        left = 0
        if not drained:
            for ctx in list(self._running.values()):
                self._cancel_ctx(ctx, "shutting_down", by_broker=False)
            self._flush_reader_batch()
            end = _monotonic() + EOF_GRACE
            while self._running and _monotonic() < end:
                time.sleep(0.005)
            left = len(self._running)
        self._flush_loop(0.2)
        self._writer.flush(0.5)  # type: ignore[union-attr]
        return left

    # --- frames in -----------------------------------------------------------

    def _on_other(self, head: Dict[str, Any], raw: Optional[bytes], value: Any) -> None:
        """A frame that is not a request."""
        kind = head.get("type")
        if kind == "response" or kind == "error":
            self._on_reply(kind, head, raw, value)
        elif kind == "event":
            self._on_event(head, raw, value)
        else:
            log.warning("[%s] skipping a frame of unknown type %r", self._process_id, kind)

    def _on_request(self, head: Dict[str, Any], raw: Optional[bytes], value: Any, now: float) -> None:
        get = head.get
        method = get("id")
        cid = get("correlation_id")
        source = get("source")
        timeout_ms = get("timeout_ms")
        stream = get("stream")
        key = get("key")
        if (type(cid) is not int or type(source) is not str or type(method) is not str or not method
                or not source or cid < 0 or cid > _U64_MAX
                or (timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms < 0))
                or (stream is not None and type(stream) is not bool)
                or (key is not None and type(key) is not str)):
            self._bad_request(head)
            return
        out = self._out
        if self._draining:
            out.append(_wire.error(method, cid, source, "shutting_down", "the service is shutting down"))
            return
        h = self._methods.get(method)
        if h is None:
            if method == "Ping":
                out.append(_wire.response(method, cid, source, b"\x80"))
            else:
                out.append(_wire.error(method, cid, source, "unknown_method", f"no method {method!r}"))
            return
        if h.raw:
            arg = raw
        elif value is not _NOT_DECODED:
            arg = value
        else:
            try:
                arg = decode_value(raw)  # type: ignore[arg-type]
            except Exception as e:
                out.append(_wire.error(method, cid, source, "bad_request",
                                       f"the payload does not decode: {_describe(e)}"))
                return
        kind = h.kind
        if kind == _INLINE:
            if h.ctx:
                ctx = Context(source, cid, method, raw, None if timeout_ms is None else now + timeout_ms / 1000,
                              stream is True, key)
                out.append(self._call_plain(h, arg, ctx, method, cid, source))
                return
            # The hot path (an echo, a lookup): no context, no hand-off.
            try:
                result = h.fn(arg)
            except Exception:
                out.append(self._call_plain(h, arg, None, method, cid, source))
                return
            if h.raw and (result is None or type(result) is bytes):
                out.append(_response(method, cid, source, result))
            elif type(result) is Raw:
                out.append(_response(method, cid, source, result.data))
            else:
                out.append(self._reply(result, method, cid, source, False))
            return
        ctx = Context(source, cid, method, raw, None if timeout_ms is None else now + timeout_ms / 1000,
                      stream is True, key)
        self._running[(source, cid)] = ctx
        if kind == _SYNC or kind == _GEN:
            self._pool.submit(self._run_sync, h, arg, ctx)
        else:
            self._defer(self._ensure_loop(), self._start_async, h, arg, ctx)

    def _bad_request(self, head: Dict[str, Any]) -> None:
        """A request whose envelope is wrong: answered ``bad_request`` when
        it can be (a correlation id and a source to reply to), else logged."""
        method, cid, source = head.get("id"), head.get("correlation_id"), head.get("source")
        if type(cid) is not int or cid < 0 or cid > _U64_MAX or type(source) is not str or not source:
            log.warning("[%s] skipping a request without a valid correlation_id and source", self._process_id)
            return
        if type(method) is not str or not method:
            why, method = "its id (the method) must be a non-empty str", "?"
        elif head.get("timeout_ms") is not None and (type(head["timeout_ms"]) is not int or head["timeout_ms"] < 0):
            why = "timeout_ms must be an unsigned int"
        elif head.get("stream") is not None and type(head["stream"]) is not bool:
            why = "stream must be a bool"
        else:
            why = "key must be a str"
        log.warning("[%s] bad request from %s: %s", self._process_id, source, why)
        self._out.append(_wire.error(method, cid, source, "bad_request", f"invalid request: {why}"))

    def _call_plain(self, h: _Handler, arg: Any, ctx: Optional[Context], method: str, cid: int,
                    source: str) -> bytes:
        """Runs a plain handler here; its reply frame."""
        try:
            result = h.fn(arg, ctx) if h.ctx else h.fn(arg)
        except CallError as e:
            return _wire.error(method, cid, source, _code(e.code), _text(e.message))
        except Exception as e:
            log.warning("[%s] handler %s failed", self._process_id, method, exc_info=True)
            return _wire.error(method, cid, source, "handler", _describe(e))
        return self._reply(result, method, cid, source, h.raw)

    def _reply(self, result: Any, method: str, cid: int, source: str, raw: bool) -> bytes:
        """The reply frame for a handler's result (a raw handler's bytes or
        None are the payload's bytes, or no payload)."""
        try:
            payload = _payload_of(result, raw)
        except Exception as e:
            return _wire.error(method, cid, source, "internal", f"the result does not encode: {_describe(e)}")
        return _wire.response(method, cid, source, payload)

    def _on_reply(self, kind: str, head: Dict[str, Any], raw: Optional[bytes], value: Any) -> None:
        cid = head.get("correlation_id")
        if type(cid) is not int:
            log.warning("[%s] skipping a reply without a valid correlation_id", self._process_id)
            return
        w = self._pending.get(cid)
        if w is None:
            log.debug("[%s] reply to no call in flight (correlation_id %r) dropped", self._process_id, cid)
            return
        if kind == "response" and head.get("more") is True:
            if w.stream:
                self._stream_partial(cid, w, raw)
            return
        if self._pending.pop(cid, None) is not None:
            self._deliver(w, (kind, head, (raw, value)))

    def _deliver(self, w: Any, outcome: _Outcome) -> None:
        t = type(w)
        if t is _SyncCall:
            w.finish(outcome)
        elif t is _AsyncCall:
            self._defer(w.loop, _set_future, w.fut, outcome)
        elif t is _SyncStreamState:
            with w.cond:
                if w.final is None:
                    w.final = outcome
                w.cond.notify()
        else:
            if w.final is None:
                w.final = outcome
            self._defer(w.loop, _wake_async_stream, w)

    def _stream_partial(self, cid: int, w: Any, raw: Optional[bytes]) -> None:
        if type(w) is _SyncStreamState:
            with w.cond:
                behind = len(w.items) >= STREAM_BUFFER
                if not behind:
                    w.items.append(raw)
                    w.cond.notify()
        else:
            behind = len(w.items) >= STREAM_BUFFER
            if not behind:
                w.items.append(raw)
                self._defer(w.loop, _wake_async_stream, w)
        if behind:
            # The reader fell behind: cut the stream (the broker frees the
            # worker), drop this partial, and end it with `busy`.
            self._pending.pop(cid, None)
            self._out.append(_wire.event(BROKER, "cancel", None, cid))
            self._deliver(w, ("abort", "busy", f"the stream's reader fell {STREAM_BUFFER} partial replies behind"))

    def _abort_waiter(self, w: Any, code: str, message: str) -> None:
        self._deliver(w, ("abort", code, message))

    def _on_event(self, head: Dict[str, Any], raw: Optional[bytes], value: Any) -> None:
        name = head.get("id")
        source = head.get("source")
        if name == "cancel":
            if source == BROKER:
                self._on_cancel(head, value)
            else:
                log.debug("[%s] cancel from %r ignored", self._process_id, source)
            return
        if name == "shutdown":
            if source == BROKER:
                self._on_shutdown()
            else:
                log.warning("[%s] ignoring shutdown from %r", self._process_id, source)
            return
        if type(name) is not str:
            log.warning("[%s] skipping an event without a name", self._process_id)
            return
        h = self._events.get(name)
        if h is None:
            return
        if h.raw:
            arg = raw
        elif value is not _NOT_DECODED:
            arg = value
        else:
            try:
                arg = decode_value(raw)  # type: ignore[arg-type]
            except Exception as e:
                log.warning("[%s] event %s: the payload does not decode: %s", self._process_id, name, _describe(e))
                return
        ctx = EventContext(source if type(source) is str else "", name, raw)
        if h.kind == _INLINE:
            self._run_event(h, arg, ctx)
        elif h.kind == _SYNC:
            self._pool.submit(self._run_event, h, arg, ctx)
        else:
            self._defer(self._ensure_loop(), self._start_async_event, h, arg, ctx)

    def _run_event(self, h: _Handler, arg: Any, ctx: EventContext) -> None:
        try:
            if h.ctx:
                h.fn(arg, ctx)
            else:
                h.fn(arg)
        except Exception:
            log.warning("[%s] event handler %s failed", self._process_id, h.name, exc_info=True)

    def _on_cancel(self, head: Dict[str, Any], notice: Any) -> None:
        cid = head.get("correlation_id")
        if type(notice) is not dict or type(notice.get("source")) is not str:
            log.warning("[%s] cancel without {source, reason} ignored", self._process_id)
            return
        reason = notice.get("reason")
        if type(reason) is not str or not reason:
            reason = "cancelled"
        ctx = self._running.get((notice["source"], cid))  # type: ignore[arg-type]
        if ctx is None:
            log.debug("[%s] cancel of no running request ignored", self._process_id)
            return
        self._cancel_ctx(ctx, reason, by_broker=True)

    def _cancel_ctx(self, ctx: Context, reason: str, by_broker: bool) -> None:
        # The reason is set before the task is looked at: a task not yet
        # started (or not yet known here) sees it when it starts.
        if ctx._cancel(reason, by_broker):
            task = ctx._task
            if task is not None:
                self._loop.call_soon_threadsafe(task.cancel, reason)  # type: ignore[union-attr]

    def _on_shutdown(self) -> None:
        if self._draining:
            return
        log.info("[%s] shutdown: finishing the requests in flight", self._process_id)
        self._stopping = True
        self._wake_r, self._wake_w = os.pipe()
        with self._lock:
            self._draining = True

    # --- running handlers ----------------------------------------------------

    def _run_sync(self, h: _Handler, arg: Any, ctx: Context) -> None:
        token = current.set(ctx)
        frame: Optional[bytes] = None
        try:
            if h.kind == _GEN:
                frame = self._run_generator(h, arg, ctx)
            else:
                frame = self._call_plain(h, arg, ctx, ctx.method, ctx.correlation_id, ctx.source)
        except BaseException as e:  # SystemExit and the like: still one reply
            frame = _wire.error(ctx.method, ctx.correlation_id, ctx.source, "handler", _describe(e))
        finally:
            current.reset(token)
            self._done(ctx, frame)

    def _run_generator(self, h: _Handler, arg: Any, ctx: Context) -> Optional[bytes]:
        method, cid, source = ctx.method, ctx.correlation_id, ctx.source
        try:
            gen = h.fn(arg, ctx) if h.ctx else h.fn(arg)
            while True:
                if ctx._reason is not None:
                    gen.close()
                    return self._cancelled_reply(ctx)
                try:
                    value = next(gen)
                except StopIteration as stop:
                    final = stop.value
                    break
                if ctx.stream and ctx._reason is None:
                    try:
                        payload = _payload_of(value, h.raw)
                    except Exception as e:
                        gen.close()
                        return _wire.error(method, cid, source, "internal",
                                           f"a partial reply does not encode: {_describe(e)}")
                    writer = self._writer
                    writer.send(_wire.response(method, cid, source, payload, more=True))  # type: ignore[union-attr]
                    if writer.depth >= HIGH_WATER:  # type: ignore[union-attr]
                        writer.wait_room(lambda: ctx._reason is not None)  # type: ignore[union-attr]
        except CallError as e:
            return _wire.error(method, cid, source, _code(e.code), _text(e.message))
        except Exception as e:
            log.warning("[%s] handler %s failed", self._process_id, method, exc_info=True)
            return _wire.error(method, cid, source, "handler", _describe(e))
        return self._reply(final, method, cid, source, h.raw)

    def _cancelled_reply(self, ctx: Context) -> Optional[bytes]:
        if ctx._by_broker:
            return None
        return _wire.error(ctx.method, ctx.correlation_id, ctx.source, "cancelled",
                           f"the request was cancelled ({ctx._reason})")

    def _done(self, ctx: Context, frame: Optional[bytes], send: Optional[Callable[[bytes], None]] = None) -> None:
        """A handler finished: send its reply (not when the broker cancelled
        it: the broker no longer waits for it), through ``send`` when given,
        then forget its request (in that order: the last reply of a drain is
        on its way before the service may exit)."""
        if frame is not None and not ctx._by_broker:
            if send is not None:
                send(frame)
            else:
                self._writer.send(frame)  # type: ignore[union-attr]
        key = (ctx.source, ctx.correlation_id)
        running = self._running
        if running.get(key) is ctx:
            running.pop(key, None)
        if not running and self._wake_w is not None:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    # --- the event loop ------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run_loop() -> None:
                    asyncio.set_event_loop(loop)
                    self._loop_ident = threading.get_ident()
                    loop.call_soon(started.set)
                    loop.run_forever()

                threading.Thread(target=run_loop, name="procbroker-asyncio", daemon=True).start()
                started.wait()
                self._loop = loop
            return self._loop  # type: ignore[return-value]

    def _defer(self, loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
        """Runs ``fn(*args)`` on ``loop``: from the reader thread, batched
        (one wake-up of the loop per read); from elsewhere, at once."""
        if threading.get_ident() == self._reader_ident:
            jobs = self._deferred.get(loop)
            if jobs is None:
                jobs = self._deferred[loop] = []
            jobs.append((fn, args))
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _start_async(self, h: _Handler, arg: Any, ctx: Context) -> None:
        ctx._task = self._loop.create_task(self._run_async(h, arg, ctx))  # type: ignore[union-attr]

    def _send_from_loop(self, frame: bytes) -> None:
        """Queues a reply made on the event loop; the replies of one turn
        of the loop go out in one write."""
        out = self._loop_out
        out.append(frame)
        if len(out) == 1:
            self._loop.call_soon(self._flush_loop_out)  # type: ignore[union-attr]

    def _flush_loop_out(self) -> None:
        out, self._loop_out = self._loop_out, []
        if out:
            self._writer.send_many(out)  # type: ignore[union-attr]

    def _flush_loop(self, timeout: float) -> None:
        """Hands the event loop's queued replies to the writer (waits for
        the loop's turn, at most ``timeout``)."""
        loop = self._loop
        if loop is None:
            return
        done = threading.Event()

        def flush() -> None:
            self._flush_loop_out()
            done.set()

        try:
            loop.call_soon_threadsafe(flush)
        except RuntimeError:
            return
        done.wait(timeout)

    async def _run_async(self, h: _Handler, arg: Any, ctx: Context) -> None:
        current.set(ctx)
        method, cid, source = ctx.method, ctx.correlation_id, ctx.source
        frame: Optional[bytes] = None
        try:
            if ctx._reason is not None:
                frame = self._cancelled_reply(ctx)
            elif h.kind == _AGEN:
                frame = await self._run_async_generator(h, arg, ctx)
            else:
                result = await (h.fn(arg, ctx) if h.ctx else h.fn(arg))
                frame = self._reply(result, method, cid, source, h.raw)
        except asyncio.CancelledError:
            frame = self._cancelled_reply(ctx) if ctx._reason is not None else None
        except CallError as e:
            frame = _wire.error(method, cid, source, _code(e.code), _text(e.message))
        except Exception as e:
            log.warning("[%s] handler %s failed", self._process_id, method, exc_info=True)
            frame = _wire.error(method, cid, source, "handler", _describe(e))
        self._done(ctx, frame, self._send_from_loop)

    async def _run_async_generator(self, h: _Handler, arg: Any, ctx: Context) -> Optional[bytes]:
        method, cid, source = ctx.method, ctx.correlation_id, ctx.source
        agen = h.fn(arg, ctx) if h.ctx else h.fn(arg)
        final = None
        try:
            async for value in agen:
                if type(value) is Final:
                    final = value.value
                    break
                if ctx.stream and ctx._reason is None:
                    try:
                        payload = _payload_of(value, h.raw)
                    except Exception as e:
                        return _wire.error(method, cid, source, "internal",
                                           f"a partial reply does not encode: {_describe(e)}")
                    writer = self._writer
                    writer.send(_wire.response(method, cid, source, payload, more=True))  # type: ignore[union-attr]
                    while writer.depth >= LOW_WATER and ctx._reason is None:  # type: ignore[union-attr]
                        if writer.depth < HIGH_WATER:  # type: ignore[union-attr]
                            break
                        await asyncio.sleep(0.005)
        finally:
            await agen.aclose()
        return self._reply(final, method, cid, source, h.raw)

    def _start_async_event(self, h: _Handler, arg: Any, ctx: EventContext) -> None:
        async def run() -> None:
            try:
                await (h.fn(arg, ctx) if h.ctx else h.fn(arg))
            except Exception:
                log.warning("[%s] event handler %s failed", self._process_id, h.name, exc_info=True)

        self._loop.create_task(run())  # type: ignore[union-attr]

    # --- calls out -----------------------------------------------------------

    def _check_caller(self, sync: bool) -> None:
        if self._writer is None:
            raise CallError("closed", "the service is not running yet")
        if self._deaf:
            raise CallError("closed", "stdin closed: no reply can come")
        if self._stopping:
            raise CallError("shutting_down", "the service is shutting down: no new calls")
        if sync:
            ident = threading.get_ident()
            if ident == self._reader_ident:
                raise RuntimeError("an inline handler cannot make calls (its reply would never be read)")
            if ident == self._loop_ident:
                raise RuntimeError("a blocking call on the event loop: use `await svc.acall(...)`")

    def _timeout(self, timeout: Optional[float]) -> float:
        if timeout is not None:
            return max(float(timeout), 0.001)
        ctx = current.get()
        if ctx is not None and ctx.deadline is not None:
            return max(ctx.deadline - _monotonic(), 0.001)
        return DEFAULT_CALL_TIMEOUT

    def _submit(self, w: Any, target: str, method: str, payload: Any, timeout: float, key: Optional[str],
                stream: bool) -> int:
        if not isinstance(target, str) or not target:
            raise CallError("bad_request", "the target must be a non-empty str")
        if not isinstance(method, str) or not method:
            raise CallError("bad_request", "the method must be a non-empty str")
        if key is not None and (not isinstance(key, str) or len(key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES):
            raise CallError("bad_request", f"a key is a str of at most {MAX_KEY_BYTES} bytes")
        try:
            data = None if payload is None else encode_value(payload)
        except Exception as e:
            raise CallError("bad_request", f"the payload does not encode: {_describe(e)}") from None
        cid = next(self._cids)
        frame = _wire.request(target, method, cid, data, max(1, int(timeout * 1000)), key, stream)
        if len(frame) - 4 > self._max_frame:
            raise CallError("too_large", f"the request is {len(frame) - 4} bytes (at most {self._max_frame})")
        self._pending[cid] = w
        self._writer.send(frame)  # type: ignore[union-attr]
        return cid

    def _give_up(self, cid: int) -> bool:
        """The caller stops waiting for call ``cid``: if it was still in
        flight, the broker is told (``cancel``), so the worker stops."""
        if self._pending.pop(cid, None) is None:
            return False
        if not self._deaf:
            self._writer.send(_wire.event(BROKER, "cancel", None, cid))  # type: ignore[union-attr]
        return True

    def call(self, target: str, method: str, payload: Any = None, timeout: Optional[float] = None,
             key: Optional[str] = None, *, cancel: Optional[threading.Event] = None, raw: bool = False) -> Any:
        """Calls ``method`` of ``target`` (a service, a process id, or
        ``broker``) and returns the reply's decoded payload (``raw=True``:
        a ``Raw``); raises ``CallError`` with the error reply's code and
        message.

        ``timeout`` (seconds) is sent as ``timeout_ms``; by default, inside
        a handler, what is left of its request's deadline, else 30 s.
        ``key`` routes calls with the same key to the same worker. Setting
        ``cancel`` (a ``threading.Event``) gives up the call, and so does
        the cancellation of the request whose handler makes it: the broker
        is told, and ``CallError("cancelled")`` is raised.
        """
        self._check_caller(True)
        t = self._timeout(timeout)
        w = _SyncCall()
        cid = self._submit(w, target, method, payload, t, key, False)
        ctx = current.get()
        hook = None
        if ctx is not None:
            def hook(reason: str) -> None:
                w.finish(("abort", "cancelled", f"the request being served was cancelled ({reason})"))
            ctx._add_hook(hook)
        given_up = False
        try:
            if cancel is None:
                w.lock.acquire(timeout=t + CALL_GRACE)
            else:
                # An Event cannot wake us: look at it every 10 ms.
                end = _monotonic() + t + CALL_GRACE
                while not w.lock.acquire(timeout=max(0.0, min(end - _monotonic(), 0.01))):
                    if cancel.is_set():
                        given_up = True
                        break
                    if _monotonic() >= end:
                        break
        finally:
            if hook is not None:
                ctx._remove_hook(hook)  # type: ignore[union-attr]
        outcome = w.outcome
        if outcome is None:
            if given_up:
                outcome = ("abort", "cancelled", "the call was cancelled")
            else:
                outcome = ("abort", "timeout", f"no reply within {t + CALL_GRACE:.3f} s")
        if outcome[0] == "abort":
            self._give_up(cid)
        return _outcome_value(outcome, raw)

    async def acall(self, target: str, method: str, payload: Any = None, timeout: Optional[float] = None,
                    key: Optional[str] = None, *, raw: bool = False) -> Any:
        """``call`` for coroutines (on any event loop): cancelling the task
        that awaits it cancels the request."""
        self._check_caller(False)
        loop = asyncio.get_running_loop()
        t = self._timeout(timeout)
        w = _AsyncCall(loop)
        cid = self._submit(w, target, method, payload, t, key, False)
        fut = w.fut
        timer = loop.call_later(t + CALL_GRACE, _set_future, fut,
                                ("abort", "timeout", f"no reply within {t + CALL_GRACE:.3f} s"))
        try:
            outcome = await fut
        except asyncio.CancelledError:
            self._give_up(cid)
            raise
        finally:
            timer.cancel()
        if outcome[0] == "abort":
            self._give_up(cid)
        return _outcome_value(outcome, raw)

    def stream(self, target: str, method: str, payload: Any = None, timeout: Optional[float] = None,
               key: Optional[str] = None, *, raw: bool = False) -> "Stream":
        """Calls ``method`` of ``target`` asking for partial replies: iterate
        the returned ``Stream`` for each partial payload; it stops at the
        final reply (its payload in ``.final``, and the ``StopIteration``
        value) or raises ``CallError``. Closing it early (``close()``,
        ``break`` in a ``with``) cancels the request."""
        self._check_caller(True)
        t = self._timeout(timeout)
        w = _SyncStreamState()
        cid = self._submit(w, target, method, payload, t, key, True)
        return Stream(self, cid, w, _monotonic() + t + CALL_GRACE, raw)

    def astream(self, target: str, method: str, payload: Any = None, timeout: Optional[float] = None,
                key: Optional[str] = None, *, raw: bool = False) -> "AsyncStream":
        """``stream`` for coroutines: ``async for part in svc.astream(...)``
        (call it from the event loop that iterates it)."""
        self._check_caller(False)
        loop = asyncio.get_running_loop()
        t = self._timeout(timeout)
        w = _AsyncStreamState(loop)
        cid = self._submit(w, target, method, payload, t, key, True)
        return AsyncStream(self, cid, w, loop.time() + t + CALL_GRACE, raw)

    def emit(self, target: str, event: str, payload: Any = None) -> None:
        """Sends event ``event`` to ``target`` (a process; a service: every
        worker of it; ``*``: every process). Events are not answered."""
        if self._writer is None:
            raise CallError("closed", "the service is not running yet")
        if not isinstance(target, str) or not target or not isinstance(event, str) or not event:
            raise CallError("bad_request", "an event needs a target and a name (non-empty str)")
        try:
            data = None if payload is None else encode_value(payload)
        except Exception as e:
            raise CallError("bad_request", f"the payload does not encode: {_describe(e)}") from None
        self._writer.send(_wire.event(target, event, data))


class Stream:
    """The partial replies of ``svc.stream(...)``, then its final reply."""

    def __init__(self, svc: Service, cid: int, state: _SyncStreamState, give_up_at: float, raw: bool) -> None:
        self._svc = svc
        self.correlation_id = cid
        self._state = state
        self._give_up_at = give_up_at
        self._raw = raw
        self._done = False
        #: The final reply's payload, once the stream ended with one.
        self.final: Any = None

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration(self.final)
        state = self._state
        with state.cond:
            while not state.items and state.final is None:
                left = self._give_up_at - _monotonic()
                if left <= 0:
                    break
                state.cond.wait(left)
            got = bool(state.items)
            item = state.items.popleft() if got else None
            final = state.final
        if got:
            return Raw(item) if self._raw else (None if item is None else decode_value(item))
        self._done = True
        if final is None:
            self._svc._give_up(self.correlation_id)
            final = ("abort", "timeout", "no final reply before the deadline")
        elif final[0] == "abort":
            self._svc._give_up(self.correlation_id)
        self.final = _outcome_value(final, self._raw)
        raise StopIteration(self.final)

    def close(self) -> None:
        """Stops reading: a stream not yet ended is cancelled."""
        if not self._done:
            self._done = True
            self._svc._give_up(self.correlation_id)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class AsyncStream:
    """The partial replies of ``svc.astream(...)``, then its final reply."""

    def __init__(self, svc: Service, cid: int, state: _AsyncStreamState, give_up_at: float, raw: bool) -> None:
        self._svc = svc
        self.correlation_id = cid
        self._state = state
        self._give_up_at = give_up_at
        self._raw = raw
        self._done = False
        #: The final reply's payload, once the stream ended with one.
        self.final: Any = None

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        state = self._state
        try:
            while not state.items and state.final is None:
                left = self._give_up_at - state.loop.time()
                if left <= 0:
                    break
                state.wake = state.loop.create_future()
                try:
                    await asyncio.wait_for(state.wake, left)
                except asyncio.TimeoutError:
                    pass
                finally:
                    state.wake = None
        except asyncio.CancelledError:
            self.close()
            raise
        if state.items:
            item = state.items.popleft()
            return Raw(item) if self._raw else (None if item is None else decode_value(item))
        self._done = True
        final = state.final
        if final is None:
            self._svc._give_up(self.correlation_id)
            final = ("abort", "timeout", "no final reply before the deadline")
        elif final[0] == "abort":
            self._svc._give_up(self.correlation_id)
        self.final = _outcome_value(final, self._raw)
        raise StopAsyncIteration

    def close(self) -> None:
        """Stops reading: a stream not yet ended is cancelled."""
        if not self._done:
            self._done = True
            self._svc._give_up(self.correlation_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _run_jobs(jobs: List[Tuple[Callable, tuple]]) -> None:
    for fn, args in jobs:
        try:
            fn(*args)
        except Exception:
            log.exception("procbroker: a job on the event loop failed")


def _payload_of(value: Any, raw: bool) -> Optional[bytes]:
    """A result as payload bytes: a raw handler's bytes as they are (None:
    no payload), ``Raw`` verbatim, anything else encoded."""
    if raw and (value is None or type(value) is bytes):
        return value or None
    return encode_value(value)


def _code(code: Any) -> str:
    return code if isinstance(code, str) and code else "handler"


def _text(message: Any) -> str:
    return message if isinstance(message, str) else str(message)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
