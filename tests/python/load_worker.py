#!/usr/bin/env python3
"""Load for the shutdown test (tests/run.rs): keeps LOAD_IN_FLIGHT (default
16) requests in flight to the service "echo", keeps sending (each answer,
`shutting_down` included, is followed by a new request) until it reads the
broker's `shutdown` event, as the protocol allows, and at EOF prints its
tally on stderr:

  tally sent=N answered=M ok=A shutting_down=S other=O unanswered=U
"""
import os
import struct
import sys

import msgpack

ID = os.environ.get("PROCBROKER_PROCESS_ID", "load")
out, inp = sys.stdout.buffer, sys.stdin.buffer


def send(envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    out.write(struct.pack(">I", len(body)) + body)


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = inp.read1(n - len(data)) if hasattr(inp, "read1") else inp.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main():
    send({"type": "event", "id": "ready", "target": "broker"})
    outstanding, next_id = set(), 1
    counts = {"ok": 0, "shutting_down": 0, "other": 0}
    sent = answered = 0
    sending = True

    def request():
        nonlocal next_id, sent
        send({"type": "request", "id": "Echo", "correlation_id": next_id,
              "target": "echo", "payload": next_id})
        outstanding.add(next_id)
        next_id += 1
        sent += 1

    for _ in range(int(os.environ.get("LOAD_IN_FLIGHT", "16"))):
        request()
    out.flush()
    while True:
        head = read_exact(4)
        if head is None:
            break
        body = read_exact(struct.unpack(">I", head)[0])
        if body is None:
            break
        message = msgpack.unpackb(body, raw=False)
        kind = message.get("type")
        if kind in ("response", "error"):
            cid = message.get("correlation_id")
            if cid in outstanding:
                outstanding.discard(cid)
                answered += 1
                if kind == "response":
                    counts["ok"] += 1
                elif message.get("code") == "shutting_down":
                    counts["shutting_down"] += 1
                else:
                    counts["other"] += 1
            if sending:
                request()
                out.flush()
        elif kind == "event" and message.get("id") == "shutdown" \
                and message.get("source") == "broker":
            sending = False
    print(f"tally sent={sent} answered={answered} ok={counts['ok']} "
          f"shutting_down={counts['shutting_down']} other={counts['other']} "
          f"unanswered={len(outstanding)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        pass
