#!/usr/bin/env python3
"""A worker that records when it is told to stop, for the start-order test
(tests/operations.rs).

It sends `ready` (after READY_DELAY seconds, default 0), answers nothing,
and on the broker's `shutdown` event appends "ID shutdown NS" to the file
ORDER_LOG, waits SHUTDOWN_DELAY seconds (default 0.3), appends "ID exit NS"
and exits. NS is CLOCK_MONOTONIC in nanoseconds: one clock for every
process of the machine, so lines of different workers compare.
"""
import os
import struct
import sys
import time

import msgpack

ID = os.environ.get("PROCBROKER_PROCESS_ID", "order")
LOG = os.environ["ORDER_LOG"]


def record(what):
    with open(LOG, "a") as f:
        f.write(f"{ID} {what} {time.monotonic_ns()}\n")


def send(out, envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    out.write(struct.pack(">I", len(body)) + body)
    out.flush()


def read_exact(inp, n):
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main():
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    time.sleep(float(os.environ.get("READY_DELAY", "0")))
    record("ready")
    send(out, {"type": "event", "id": "ready", "target": "broker"})
    while True:
        head = read_exact(inp, 4)
        if head is None:
            record("eof")
            return
        body = read_exact(inp, struct.unpack(">I", head)[0])
        if body is None:
            return
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
        if message.get("type") == "event" and message.get("id") == "shutdown" \
                and message.get("source") == "broker":
            record("shutdown")
            time.sleep(float(os.environ.get("SHUTDOWN_DELAY", "0.3")))
            record("exit")
            return


if __name__ == "__main__":
    main()
