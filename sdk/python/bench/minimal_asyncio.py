#!/usr/bin/env python3
"""minimal_loop.py on asyncio: the loop reads stdin (add_reader) and runs
each request as a task (an `async def` echo), writing the replies of each
turn together. What a task per request costs in CPython by itself, to
compare with the SDK's `async def` handlers (sdk_echo.py async)."""
import asyncio
import os
import struct
import sys

import msgpack


async def main():
    out = sys.stdout.buffer.fileno()
    inp = sys.stdin.buffer.fileno()
    pack_len = struct.Struct(">I").pack
    unpack_len = struct.Struct(">I").unpack_from
    packb, unpackb = msgpack.packb, msgpack.unpackb
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    replies = []

    def flush():
        data = b"".join(replies)
        replies.clear()
        os.write(out, data)

    async def echo(msg):
        body = packb({"type": "response", "id": msg["id"], "correlation_id": msg["correlation_id"],
                      "target": msg["source"], "payload": msg.get("payload")})
        if not replies:
            loop.call_soon(flush)
        replies.append(pack_len(len(body)) + body)

    state = {"buf": b""}

    def readable():
        chunk = os.read(inp, 1 << 16)
        if not chunk:
            loop.remove_reader(inp)
            done.set_result(None)
            return
        buf = state["buf"] + chunk
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = unpack_len(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            msg = unpackb(buf[pos + 4:pos + 4 + n], raw=False)
            pos += 4 + n
            if msg.get("type") == "request":
                loop.create_task(echo(msg))
        state["buf"] = buf[pos:]

    ready = packb({"type": "event", "id": "ready", "target": "broker"})
    os.write(out, pack_len(len(ready)) + ready)
    loop.add_reader(inp, readable)
    await done


if __name__ == "__main__":
    asyncio.run(main())
