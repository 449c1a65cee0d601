"""A MessagePack-RPC child that misbehaves on request (tests/msgpack_rpc.rs).

Answers method `echo` with its params and `pid` with its pid; `stray` is
answered twice, first under a msgid nobody used, then properly; for `garbage`,
`wrong_type` and `huge` it writes, instead of a reply, bytes that are not
MessagePack, a 4-element array of the wrong type, and a value larger than
the broker's limit (`PROCBROKER_TEST_HUGE` bytes). Exits at EOF.
"""

import os
import sys

import msgpack

out = sys.stdout.buffer


def write(value):
    out.write(value if isinstance(value, bytes) else msgpack.packb(value))
    out.flush()


unpacker = msgpack.Unpacker(raw=False)
stdin = sys.stdin.buffer
while True:
    chunk = stdin.read1(65536)
    if not chunk:
        break
    unpacker.feed(chunk)
    for message in unpacker:
        if not isinstance(message, list) or len(message) != 4 or message[0] != 0:
            continue
        _, msgid, method, params = message
        if method == "echo":
            write([1, msgid, None, params])
        elif method == "pid":
            write([1, msgid, None, os.getpid()])
        elif method == "stray":
            write([1, msgid + 1000, None, "stray"])
            write([1, msgid, None, "ok"])
        elif method == "garbage":
            write(b"\xc1\xc1\xc1 this is not msgpack")
        elif method == "wrong_type":
            write([5, msgid, "not", "rpc"])
        elif method == "huge":
            write([1, msgid, None, b"x" * int(os.environ["PROCBROKER_TEST_HUGE"])])
        else:
            write([1, msgid, [0, f"no method {method}"], None])
