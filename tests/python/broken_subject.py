"""A conformance subject with two deliberate faults, for the kit's own test.

It serves Ping, Echo, Sleep, Active, Deadline and LastCancel, and answers
every other method `unknown_method`. Its faults:

- it ignores `cancel`: a Sleep runs to its end whatever the broker says,
  and LastCancel is always nil;
- at EOF it prints a line on stdout (a stray `print`), where only frames
  may go.

Everything else is as PROTOCOL.md asks (threads for Sleep, one lock
around stdout), so the kit's other checks of what it serves pass.
"""

import os
import struct
import sys
import threading
import time

import msgpack

inp, out = sys.stdin.buffer, sys.stdout.buffer
write_lock = threading.Lock()
state_lock = threading.Lock()
sleeping = 0


def send(envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    with write_lock:
        out.write(struct.pack(">I", len(body)) + body)
        out.flush()


def read_exactly(n):
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def recv():
    head = read_exactly(4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    body = read_exactly(n)
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def reply(msg, payload=None, has_payload=True):
    envelope = {
        "type": "response",
        "id": msg["id"],
        "correlation_id": msg["correlation_id"],
        "target": msg["source"],
    }
    if has_payload:
        envelope["payload"] = payload
    send(envelope)


def error(msg, code, message):
    send({
        "type": "error",
        "id": msg["id"],
        "correlation_id": msg["correlation_id"],
        "target": msg["source"],
        "code": code,
        "error": message,
    })


def sleep(msg):
    global sleeping
    ms = msg["payload"]["ms"]
    with state_lock:
        sleeping += 1
    started = time.monotonic()
    time.sleep(ms / 1000.0)  # fault: no cancel can cut this short
    with state_lock:
        sleeping -= 1
    reply(msg, {"slept_ms": int((time.monotonic() - started) * 1000), "cancelled": False})


def serve(msg):
    method = msg["id"]
    if method == "Ping":
        reply(msg, {})
    elif method == "Echo":
        reply(msg, msg.get("payload"), "payload" in msg)
    elif method == "Sleep":
        threading.Thread(target=sleep, args=(msg,), daemon=True).start()
    elif method == "Active":
        with state_lock:
            reply(msg, {"sleeping": sleeping})
    elif method == "Deadline":
        reply(msg, msg.get("timeout_ms"))
    elif method == "LastCancel":
        reply(msg, None)  # fault: cancels are never seen
    else:
        error(msg, "unknown_method", "no method %r" % method)


def main():
    send({"type": "event", "id": "ready", "target": "broker"})
    while True:
        msg = recv()
        if msg is None:
            break
        if msg.get("type") == "request":
            serve(msg)
    # Fault: a line on stdout.
    with write_lock:
        out.write(b"exiting\n")
        out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
