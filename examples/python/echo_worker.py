#!/usr/bin/env python3
"""A procbroker worker in Python, written from PROTOCOL.md alone.

Serves two methods:
  Echo     -> replies with the request's payload
  Reverse  -> replies with the payload string reversed (bad_request if not a str)
Any other method gets an error reply with code "unknown_method".

Life cycle (PROTOCOL.md section 3): announce `ready` to the broker, serve until
the `shutdown` event or EOF on stdin, log to stderr only (stdout carries frames).

Needs only the `msgpack` package: python3 -m pip install msgpack
"""
import os
import struct
import sys

import msgpack

MAX_FRAME = 16 * 1024 * 1024
PROCESS_ID = os.environ.get("PROCBROKER_PROCESS_ID", "echo_worker")


def log(message):
    print(f"[{PROCESS_ID}] {message}", file=sys.stderr, flush=True)


def read_exact(stream, n):
    """n bytes, or None at a clean EOF; raises on EOF inside a frame."""
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            if data:
                raise EOFError("stdin ended inside a frame")
            return None
        data += chunk
    return bytes(data)


def read_frame(stream):
    head = read_exact(stream, 4)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head)
    if not 1 <= length <= MAX_FRAME:
        raise ValueError(f"frame length {length} out of range")
    body = read_exact(stream, length)
    if body is None:
        raise EOFError("stdin ended inside a frame")
    return body


def send(stream, envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def reply(request, payload=None, error=None, code=None):
    envelope = {
        "id": request["id"],
        "correlation_id": request["correlation_id"],
        "target": request.get("source", ""),
    }
    if code is None:
        envelope["type"] = "response"
        envelope["payload"] = payload
    else:
        envelope.update(type="error", code=code, error=error)
    return envelope


def handle(request):
    method = request["id"]
    payload = request.get("payload")
    if method == "Echo":
        return reply(request, payload)
    if method == "Ping":  # the broker's health check
        return reply(request, {})
    if method == "Reverse":
        if not isinstance(payload, str):
            return reply(request, error="Reverse takes a string", code="bad_request")
        return reply(request, payload[::-1])
    return reply(request, error=f"no method {method!r}", code="unknown_method")


def main():
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    send(out, {"type": "event", "id": "ready", "target": "broker"})
    log("ready")
    while True:
        body = read_frame(inp)
        if body is None:
            log("stdin closed: exiting")
            return
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=False)
            kind = message["type"]
        except Exception as e:  # a bad frame is logged and skipped
            log(f"skipping a bad frame: {e}")
            continue
        if kind == "request":
            send(out, handle(message))
        elif kind == "event" and message.get("id") == "shutdown":
            # Only the broker may stop us: another process's `shutdown`
            # (the broker drops those, but be safe) is ignored.
            if message.get("source") != "broker":
                log(f"ignoring shutdown from {message.get('source')!r}")
                continue
            log("shutdown: exiting")
            return


if __name__ == "__main__":
    main()
