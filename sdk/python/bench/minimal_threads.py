#!/usr/bin/env python3
"""minimal_loop.py with one thread hop per request: the reader hands each
request to a pool of 16 threads (a queue.SimpleQueue), which answer it and
write the reply. What handing work to threads costs in CPython by itself,
to compare with the SDK's thread pool (sdk_echo.py plain)."""
import os
import queue
import struct
import sys
import threading

import msgpack


def main():
    out = sys.stdout.buffer.fileno()
    inp = sys.stdin.buffer.fileno()
    pack_len = struct.Struct(">I").pack
    unpack_len = struct.Struct(">I").unpack_from
    packb, unpackb = msgpack.packb, msgpack.unpackb
    jobs = queue.SimpleQueue()
    write_lock = threading.Lock()

    def work():
        while True:
            msg = jobs.get()
            body = packb({"type": "response", "id": msg["id"], "correlation_id": msg["correlation_id"],
                          "target": msg["source"], "payload": msg.get("payload")})
            with write_lock:
                os.write(out, pack_len(len(body)) + body)

    for _ in range(16):
        threading.Thread(target=work, daemon=True).start()
    ready = packb({"type": "event", "id": "ready", "target": "broker"})
    os.write(out, pack_len(len(ready)) + ready)
    buf = b""
    while True:
        chunk = os.read(inp, 1 << 16)
        if not chunk:
            return
        buf += chunk
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = unpack_len(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            msg = unpackb(buf[pos + 4:pos + 4 + n], raw=False)
            pos += 4 + n
            if msg.get("type") == "request":
                jobs.put(msg)
        buf = buf[pos:]


if __name__ == "__main__":
    main()
