#!/usr/bin/env python3
"""The Python SDK's conformance subject.

A service that implements the methods a conformance kit calls to check an
SDK (PROTOCOL.md lists them), written with the SDK alone, so it also shows
the SDK's lifecycle API at work: deadlines, cancellation, streaming replies,
calls and events. State is per process.

Run it under the kit: ``procbroker conformance -- python3 sdk/python/conformance/subject.py``.
"""

import os
import sys
import threading
import time

try:
    import procbroker
except ImportError:  # run from a checkout without `pip install ./sdk/python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import procbroker

import msgpack

from procbroker import CallError, Raw, Service

svc = Service()
NIL = b"\xc0"
lock = threading.Lock()
state = {"sleeping": 0, "last_cancel": None, "last_note": None}


def remember_cancel(ctx):
    """Keeps the cancel that reached this handler, for `LastCancel`."""
    if ctx.cancel_reason is not None:
        with lock:
            state["last_cancel"] = {"correlation_id": ctx.correlation_id, "reason": ctx.cancel_reason}


def fields(raw, names):
    """The raw bytes of `names` in a map payload (None when absent): the
    values are carried verbatim, never re-encoded."""
    if raw is None:
        raise CallError("bad_request", "the payload must be a map, found none")
    up = msgpack.Unpacker(raw=False, strict_map_key=False)
    up.feed(raw)
    try:
        entries = up.read_map_header()
    except Exception:
        raise CallError("bad_request", "the payload must be a map") from None
    found = dict.fromkeys(names)
    for _ in range(entries):
        key = up.unpack()
        start = up.tell()
        up.skip()
        if key in found:
            found[key] = raw[start:up.tell()]
    return found


def required_str(found, name):
    raw = found[name]
    value = None if raw is None else msgpack.unpackb(raw, raw=False)
    if not isinstance(value, str) or not value:
        raise CallError("bad_request", f"{name!r} must be a non-empty str")
    return value


@svc.method("Echo", raw=True, inline=True)
def echo(payload):
    return payload  # a raw handler's bytes go out as they are


@svc.method("Sleep")
def sleep(payload, ctx):
    with lock:
        state["sleeping"] += 1
    try:
        started = time.monotonic()
        # Remembered as the cancel comes, before this thread even wakes.
        ctx.on_cancel(lambda _reason: remember_cancel(ctx))
        cancelled = ctx.wait_cancelled(payload["ms"] / 1000)
        return {"slept_ms": int((time.monotonic() - started) * 1000), "cancelled": cancelled}
    finally:
        with lock:
            state["sleeping"] -= 1


@svc.method("Active", inline=True)
def active(_payload):
    return {"sleeping": state["sleeping"]}


@svc.method("Count")
def count(payload, ctx):
    n = payload["n"]
    delay = payload.get("delay_ms", 0) / 1000
    try:
        for i in range(n):
            if i and delay and ctx.wait_cancelled(delay):
                return None  # cancelled: this reply is not sent
            yield i
        return n
    finally:
        remember_cancel(ctx)


@svc.method("Fail")
def fail(payload):
    raise CallError(payload.get("code") or "handler", payload["message"])


@svc.method("Deadline")
async def deadline(_payload, ctx):
    return ctx.remaining_ms()


@svc.method("WhoAmI", inline=True)
def who_am_i(_payload):
    return {"id": svc.process_id, "pid": os.getpid()}


@svc.method("Relay", raw=True)
def relay(payload, ctx):
    # The call gets what is left of this request's deadline and is given up
    # (cancelled at the broker) if this request is cancelled.
    found = fields(payload, ["target", "method", "payload"])
    target, method = required_str(found, "target"), required_str(found, "method")
    try:
        return svc.call(target, method, Raw(found["payload"]), raw=True)
    finally:
        remember_cancel(ctx)


@svc.method("Notify", raw=True)
def notify(payload):
    found = fields(payload, ["target", "event", "payload"])
    svc.emit(required_str(found, "target"), required_str(found, "event"), Raw(found["payload"]))
    return NIL  # a raw handler returns bytes: this is MessagePack nil


@svc.method("LastCancel", inline=True)
def last_cancel(_payload):
    with lock:
        return state["last_cancel"]


@svc.method("LastNote", inline=True)
def last_note(_payload):
    note = state["last_note"]
    return None if note is None else Raw(note)


@svc.event("note", raw=True, inline=True)
def on_note(payload):
    state["last_note"] = payload if payload is not None else NIL


if __name__ == "__main__":
    svc.run()
