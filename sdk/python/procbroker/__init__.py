"""procbroker: write services for the procbroker broker in Python.

A service registers handlers on a ``Service`` and calls ``run()``; the SDK
speaks the broker's wire protocol on stdin/stdout: frames, correlation ids,
the ``ready`` handshake, ``Ping``, ``shutdown`` (from the broker only), EOF,
deadlines, ``cancel``, streaming replies, calls out and events::

    from procbroker import Service

    svc = Service()

    @svc.method("Echo")
    def echo(payload, ctx):
        return payload

    svc.run()
"""

from ._context import Context, EventContext
from ._service import (
    CALL_GRACE,
    DEFAULT_CALL_TIMEOUT,
    STREAM_BUFFER,
    AsyncStream,
    CallError,
    Final,
    Service,
    Stream,
)
from ._wire import DEFAULT_MAX_FRAME_BYTES, FrameError, Raw

__version__ = "0.1.0"

__all__ = [
    "AsyncStream",
    "CALL_GRACE",
    "CallError",
    "Context",
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_MAX_FRAME_BYTES",
    "EventContext",
    "Final",
    "FrameError",
    "Raw",
    "STREAM_BUFFER",
    "Service",
    "Stream",
    "__version__",
]
