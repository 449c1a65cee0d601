"""What a handler knows of its request beyond the payload."""

from __future__ import annotations

import asyncio
import threading
import time
from contextvars import ContextVar
from typing import Any, Callable, List, Optional

_monotonic = time.monotonic

#: The request whose handler is running on this thread or task: calls made
#: from a handler default to its remaining budget and give up when it is
#: cancelled.
current: ContextVar[Optional["Context"]] = ContextVar("procbroker_current", default=None)

# Guards the lazy parts of every context (its event and hooks): cancelling
# and waiting race only through them.
_lock = threading.Lock()


class Context:
    """A request as its handler sees it.

    ``source`` (the requester's process id, ``broker`` for health checks),
    ``correlation_id``, ``method``, ``raw_payload`` (the payload's
    MessagePack bytes, None when the request had none), ``deadline`` (a
    ``time.monotonic()`` value: when the caller stops waiting; None when the
    request carried no ``timeout_ms``), ``stream`` (the caller takes partial
    replies), ``key`` (its routing key or None), ``cancelled`` and
    ``cancel_reason``.
    """

    __slots__ = ("source", "correlation_id", "method", "raw_payload", "deadline", "stream", "key",
                 "_reason", "_by_broker", "_event", "_hooks", "_task", "__weakref__")

    def __init__(self, source: str, correlation_id: int, method: str, raw_payload: Optional[bytes],
                 deadline: Optional[float], stream: bool = False, key: Optional[str] = None) -> None:
        self.source = source
        self.correlation_id = correlation_id
        self.method = method
        self.raw_payload = raw_payload
        self.deadline = deadline
        self.stream = stream
        self.key = key
        self._reason: Optional[str] = None
        self._by_broker = False
        self._event: Optional[threading.Event] = None
        self._hooks: Optional[List[Callable[[str], Any]]] = None
        self._task: Optional["asyncio.Task[Any]"] = None  # an async handler's

    @property
    def cancelled(self) -> bool:
        """Whether the request was cancelled (by the broker's ``cancel``, or
        at the end of stdin)."""
        return self._reason is not None

    @property
    def cancel_reason(self) -> Optional[str]:
        """Why it was cancelled: ``timeout``, ``cancelled``,
        ``caller_exited``, ``busy``, ``shutting_down`` (or a newer reason),
        None while it is not."""
        return self._reason

    def wait_cancelled(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the request is cancelled (True) or ``timeout``
        seconds pass (False). For sync handlers: an async handler is
        cancelled through its task (``asyncio.CancelledError``)."""
        if self._reason is not None:
            return True
        with _lock:
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        if self._reason is not None:
            return True
        return event.wait(timeout)

    async def wait_cancelled_async(self, timeout: Optional[float] = None) -> bool:
        """``wait_cancelled`` for coroutines: True once cancelled, False
        after ``timeout`` seconds."""
        if self._reason is not None:
            return True
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake(_reason: str) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(True))

        self._add_hook(wake)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return self._reason is not None
        finally:
            self._remove_hook(wake)

    def remaining(self) -> Optional[float]:
        """Seconds left before the deadline (0 once past it), or None."""
        if self.deadline is None:
            return None
        left = self.deadline - _monotonic()
        return left if left > 0 else 0.0

    def remaining_ms(self) -> Optional[int]:
        """The budget left in whole milliseconds (rounded down), or None."""
        if self.deadline is None:
            return None
        left = self.deadline - _monotonic()
        return int(left * 1000) if left > 0 else 0

    def on_cancel(self, fn: Callable[[str], Any]) -> None:
        """Calls ``fn(reason)`` when the request is cancelled (at once if it
        already was). It runs on the thread that reads stdin: keep it short
        and never block in it (set an event, kill a child process)."""
        self._add_hook(fn)

    # --- the SDK's side ---

    def _add_hook(self, hook: Callable[[str], Any]) -> None:
        """Runs ``hook(reason)`` when the request is cancelled (at once if
        it already was)."""
        with _lock:
            reason = self._reason
            if reason is None:
                if self._hooks is None:
                    self._hooks = []
                self._hooks.append(hook)
                return
        hook(reason)

    def _remove_hook(self, hook: Callable[[str], Any]) -> None:
        with _lock:
            if self._hooks is not None:
                try:
                    self._hooks.remove(hook)
                except ValueError:
                    pass

    def _cancel(self, reason: str, by_broker: bool) -> bool:
        """Cancels with ``reason``; False if it already was (the first
        reason stays)."""
        with _lock:
            if self._reason is not None:
                return False
            self._reason = reason
            self._by_broker = by_broker
            event, hooks, self._hooks = self._event, self._hooks, None
        if event is not None:
            event.set()
        if hooks:
            for hook in hooks:
                try:
                    hook(reason)
                except Exception:  # a hook must not stop the others
                    pass
        return True

    def __repr__(self) -> str:
        return (f"Context(method={self.method!r}, source={self.source!r}, "
                f"correlation_id={self.correlation_id}, cancelled={self.cancelled})")


class EventContext:
    """An event as its handler sees it: ``source``, ``method`` (the event's
    name) and ``raw_payload``."""

    __slots__ = ("source", "method", "raw_payload")

    def __init__(self, source: str, method: str, raw_payload: Optional[bytes]) -> None:
        self.source = source
        self.method = method
        self.raw_payload = raw_payload

    def __repr__(self) -> str:
        return f"EventContext(method={self.method!r}, source={self.source!r})"
