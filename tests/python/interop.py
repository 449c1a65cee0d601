#!/usr/bin/env python3
"""The other side of tests/interop.rs: procbroker frames from plain `msgpack`.

  interop.py gen   write a fixed set of frames to stdout (Python -> Rust)
  interop.py echo  for each frame on stdin, reply with a response frame whose
                   payload is {"seen": <envelope minus payload>, "payload": <payload>}
                   (Rust -> Python -> Rust); exits on EOF

Uses only what PROTOCOL.md describes: u32 big-endian length, one msgpack map.
"""
import struct
import sys

import msgpack


def write_frame(out, envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    out.write(struct.pack(">I", len(body)) + body)


def read_exact(inp, n):
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            if data:
                raise EOFError("stream ended inside a frame")
            return None
        data += chunk
    return data


def read_frame(inp):
    head = read_exact(inp, 4)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head)
    body = read_exact(inp, length)
    if body is None:
        raise EOFError("stream ended inside a frame")
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def gen(out):
    write_frame(out, {"type": "event", "id": "ready", "target": "broker"})
    write_frame(out, {"type": "request", "id": "Echo", "correlation_id": 1, "target": "echo",
                      "payload": {"name": "test", "value": 123}})
    write_frame(out, {"type": "request", "id": "Echo", "correlation_id": 2**64 - 1, "target": "echo.2",
                      "source": "forged", "timeout_ms": 1500,
                      "payload": [None, True, -1, -2**63, 2**64 - 1, 1.5, "", "é" * 40000,
                                  b"\x00\xff", msgpack.ExtType(5, b"abc"), {1: "int key"}]})
    write_frame(out, {"type": "response", "id": "Echo", "correlation_id": 1, "target": "client.0",
                      "payload": None, "extra": {"ignored": [1, 2, 3]}})
    write_frame(out, {"type": "error", "id": "Echo", "correlation_id": 3, "target": "client.0",
                      "code": "handler", "error": "division by zero"})
    out.flush()


def echo(inp, out):
    while True:
        envelope = read_frame(inp)
        if envelope is None:
            return
        assert isinstance(envelope, dict), f"envelope is a {type(envelope)}"
        for key in envelope:
            assert isinstance(key, str), f"key {key!r} is not a str"
        assert envelope["type"] in ("request", "response", "event", "error"), envelope["type"]
        payload = envelope.pop("payload", None)
        write_frame(out, {"type": "response", "id": envelope["id"],
                          "correlation_id": envelope.get("correlation_id", 0),
                          "target": envelope.get("source", ""), "source": "python",
                          "payload": {"seen": envelope, "payload": payload}})
        out.flush()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "gen":
        gen(sys.stdout.buffer)
    elif mode == "echo":
        echo(sys.stdin.buffer, sys.stdout.buffer)
    else:
        sys.exit(f"usage: {sys.argv[0]} gen|echo")
