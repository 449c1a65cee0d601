#!/usr/bin/env python3
"""A worker for the federation tests (tests/cluster.rs).

Methods:
  Who        -> {"id": its process id, "source": the request's source}
  Echo       -> the payload verbatim
  Sleep ms   -> sleeps, then {"slept": ms}
  Big n      -> a bin of n bytes
  Call {target, method, payload}
             -> calls target through the broker and answers
                {"source": the reply's source, "type": ..., "code": ...,
                 "payload": ...}
  Ping       -> {} (health checks)
Anything else: an `unknown_method` error.
"""

import os
import struct
import sys
import time

import msgpack

ME = os.environ.get("PROCBROKER_PROCESS_ID", "?")
inp, out = sys.stdin.buffer, sys.stdout.buffer
next_id = 0


def read_frame():
    head = inp.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    body = inp.read(n)
    if len(body) < n:
        return None
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def send(envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    out.write(struct.pack(">I", len(body)) + body)
    out.flush()


def reply(request, payload=None, code=None, error=None):
    envelope = {
        "id": request["id"],
        "correlation_id": request["correlation_id"],
        "target": request.get("source", ""),
    }
    if code is None:
        envelope.update(type="response", payload=payload)
    else:
        envelope.update(type="error", code=code, error=error)
    send(envelope)


def call(target, method, payload):
    global next_id
    next_id += 1
    send({"type": "request", "id": method, "correlation_id": next_id,
          "target": target, "payload": payload})
    while True:
        message = read_frame()
        if message is None:
            sys.exit(0)
        if message.get("type") in ("response", "error") and message.get("correlation_id") == next_id:
            return message


def main():
    send({"type": "event", "id": "ready", "target": "broker"})
    while True:
        request = read_frame()
        if request is None:
            return
        if request.get("type") != "request":
            if request.get("id") == "shutdown" and request.get("source") == "broker":
                return
            continue
        method, payload = request["id"], request.get("payload")
        if method == "Who":
            reply(request, {"id": ME, "source": request.get("source")})
        elif method == "Echo":
            reply(request, payload)
        elif method == "Ping":
            reply(request, {})
        elif method == "Sleep":
            time.sleep(payload / 1000)
            reply(request, {"slept": payload})
        elif method == "Big":
            reply(request, b"x" * payload)
        elif method == "Call":
            got = call(payload["target"], payload["method"], payload.get("payload"))
            reply(request, {"source": got.get("source"), "type": got.get("type"),
                            "code": got.get("code"), "payload": got.get("payload")})
        else:
            reply(request, code="unknown_method", error=f"no method {method!r}")


if __name__ == "__main__":
    main()
