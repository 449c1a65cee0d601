#!/usr/bin/env python3
"""The yardstick of the SDK's cost: a minimal hand-written echo worker.

What a service author writes with nothing but `msgpack`: announce `ready`,
then for each read of stdin, split the frames, decode each envelope, answer
each request with its payload, and write the replies of that read in one
`write`. No threads, no cancellation, no checks beyond what echoing needs.
(`--naive`: read each frame with two reads and flush each reply, as most
first versions do.)
"""
import os
import struct
import sys

import msgpack


def lean():
    out = sys.stdout.buffer.fileno()
    inp = sys.stdin.buffer.fileno()
    pack_len = struct.Struct(">I").pack
    unpack_len = struct.Struct(">I").unpack_from
    packb, unpackb = msgpack.packb, msgpack.unpackb
    ready = packb({"type": "event", "id": "ready", "target": "broker"})
    os.write(out, pack_len(len(ready)) + ready)
    buf = b""
    while True:
        chunk = os.read(inp, 1 << 16)
        if not chunk:
            return
        buf += chunk
        pos, replies = 0, []
        while len(buf) - pos >= 4:
            (n,) = unpack_len(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            msg = unpackb(buf[pos + 4:pos + 4 + n], raw=False)
            pos += 4 + n
            if msg.get("type") == "request":
                body = packb({"type": "response", "id": msg["id"], "correlation_id": msg["correlation_id"],
                              "target": msg["source"], "payload": msg.get("payload")})
                replies.append(pack_len(len(body)) + body)
        buf = buf[pos:]
        if replies:
            os.write(out, b"".join(replies))


def naive():
    inp, out = sys.stdin.buffer, sys.stdout.buffer

    def send(envelope):
        body = msgpack.packb(envelope)
        out.write(struct.pack(">I", len(body)) + body)
        out.flush()

    send({"type": "event", "id": "ready", "target": "broker"})
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        msg = msgpack.unpackb(inp.read(struct.unpack(">I", head)[0]), raw=False)
        if msg.get("type") == "request":
            send({"type": "response", "id": msg["id"], "correlation_id": msg["correlation_id"],
                  "target": msg["source"], "payload": msg.get("payload")})


if __name__ == "__main__":
    naive() if "--naive" in sys.argv else lean()
