#!/usr/bin/env python3
"""A misbehaving worker for procbroker's fault tests (tests/chaos.rs).

Methods (each a request from the test):
  Echo      reply with the payload
  Hold      never reply (the request stays in flight)
  Block     block its main loop (alive, reading nothing, answering nothing)
  Ping      reply {} (the broker's health check)
  Garbage   write a frame that is not MessagePack, then a request frame that is
            invalid (no target) but has a readable correlation id (77); wait for
            the broker's bad_request for it, then reply with its code/message
  Oversize  write a length prefix of 0xFFFFFFFF (stream out of sync)
  Torn      write half a frame and exit
  Junk      print a line of text to stdout, as a careless author would
  Grandchild start `sleep 300` as a child of its own and reply with its pid
  IntId     send a request whose `id` is an integer (12345) and whose
            correlation id (78) comes after it; reply with the answer's
            code and source
  Big       send a request to "echo" whose frame is exactly the payload's
            number of bytes long (without source); reply with the answer's
            code and error
  Lifecycle send the broker's lifecycle events to other processes: `shutdown`
            to "*" and to the service named in the payload, `ready` to its
            worker 0; then reply
  Metrics   submit process metrics for the process named in the payload,
            then for itself, then for 1000 invented ids; reply with the three
            answers (code or received)
  Grow      allocate the payload's number of MiB, touch every page and keep
            it; reply with VmRSS in kB
  Forge     send a request to "echo" that claims source "victim.0", and a
            response for a request never received; reply with where the
            forged request's answer was addressed

With FLOOD=1 in the environment it never reads stdin and writes requests to
the service "echo" as fast as it can. With GARBAGE=1 it writes 64-byte frames
that are not MessagePack as fast as it can. With EVENTS=1 it sends events to
"*" as fast as it can. With STUBBORN=1 it ignores SIGTERM, says ready and
then never reads stdin (so never sees EOF): only SIGKILL ends it.
"""
import os
import struct
import sys

import msgpack

ID = os.environ.get("PROCBROKER_PROCESS_ID", "chaos")
out = sys.stdout.buffer
inp = sys.stdin.buffer


def log(message):
    print(f"[{ID}] {message}", file=sys.stderr, flush=True)


def frame(envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def send(envelope):
    out.write(frame(envelope))
    out.flush()


def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def receive():
    head = read_exact(4)
    if head is None:
        return None
    body = read_exact(struct.unpack(">I", head)[0])
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False)


def reply(request, payload):
    send({"type": "response", "id": request["id"],
          "correlation_id": request["correlation_id"],
          "target": request["source"], "payload": payload})


def wait_for(correlation_id):
    """Reads until the reply with this correlation id (serving nothing else)."""
    while True:
        message = receive()
        if message is None:
            sys.exit(0)
        if message.get("type") in ("response", "error") and \
                message.get("correlation_id") == correlation_id:
            return message


def flood():
    n = 0
    batch = b"".join(
        frame({"type": "request", "id": "Echo", "correlation_id": i,
               "target": "echo", "payload": b"x" * 64})
        for i in range(256))
    while True:
        out.write(batch)  # blocks once the broker stops reading
        n += 256


def garbage():
    batch = (struct.pack(">I", 64) + b"\xc1" * 64) * 256
    while True:
        out.write(batch)


def broadcast():
    batch = frame({"type": "event", "id": "Tick", "target": "*",
                   "payload": b"y" * 32}) * 256
    while True:
        out.write(batch)


kept = []


def main():
    if os.environ.get("STUBBORN") == "1":
        import signal
        import time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        send({"type": "event", "id": "ready", "target": "broker"})
        while True:
            time.sleep(3600)
    if os.environ.get("EVENTS") == "1":
        send({"type": "event", "id": "ready", "target": "broker"})
        broadcast()
    if os.environ.get("GARBAGE") == "1":
        send({"type": "event", "id": "ready", "target": "broker"})
        garbage()
    if os.environ.get("FLOOD") == "1":
        send({"type": "event", "id": "ready", "target": "broker"})
        flood()
    send({"type": "event", "id": "ready", "target": "broker"})
    while True:
        message = receive()
        if message is None:
            return
        if message.get("type") != "request":
            continue
        method = message["id"]
        if method == "Echo":
            reply(message, message.get("payload"))
        elif method == "Hold":
            pass
        elif method == "Block":
            import time
            time.sleep(600)
        elif method == "Ping":
            reply(message, {})
        elif method == "Garbage":
            out.write(struct.pack(">I", 2) + b"\xc1\xc1")
            out.write(frame({"type": "request", "id": "Lost", "correlation_id": 77}))
            out.flush()
            error = wait_for(77)
            reply(message, {"code": error.get("code"), "error": error.get("error"),
                            "source": error.get("source")})
        elif method == "Oversize":
            out.write(b"\xff\xff\xff\xff")
            out.flush()
        elif method == "Torn":
            out.write(struct.pack(">I", 100) + b"0123456789")
            out.flush()
            os._exit(3)
        elif method == "Junk":
            print("hello from a stray print")
            sys.stdout.flush()
        elif method == "Metrics":
            def sample(pid, who):
                return {"pid": pid, "id": who, "vmrss": 99999999, "vmsize": 1,
                        "threads": 999, "state": "R",
                        "timestamp": "2026-12-02T00:00:00Z"}
            answers = []
            batches = [[sample(1, message.get("payload"))],
                       [sample(os.getpid(), ID)],
                       [sample(1, f"ghost.{i}") for i in range(1000)]]
            for n, batch in enumerate(batches):
                send({"type": "request", "id": "SubmitProcessMetrics",
                      "correlation_id": 900 + n, "target": "broker",
                      "payload": batch})
                answer = wait_for(900 + n)
                answers.append(answer.get("code") or answer["payload"]["received"])
            reply(message, answers)
        elif method == "Grow":
            kept.append(b"g" * (int(message["payload"]) << 20))
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) for line in status
                           if line.startswith("VmRSS:"))
            reply(message, rss)
        elif method == "Grandchild":
            import subprocess
            sleeper = subprocess.Popen(["sleep", "300"])
            reply(message, sleeper.pid)
        elif method == "IntId":
            send({"type": "request", "id": 12345, "correlation_id": 78,
                  "target": "echo"})
            answer = wait_for(78)
            reply(message, {"code": answer.get("code"), "source": answer.get("source")})
        elif method == "Big":
            want = message["payload"]
            n = want
            while True:
                request = {"type": "request", "id": "Echo", "correlation_id": 950,
                           "target": "echo", "payload": b"x" * n}
                size = len(msgpack.packb(request, use_bin_type=True))
                if size == want:
                    break
                n -= size - want
            send(request)
            answer = wait_for(950)
            reply(message, {"code": answer.get("code"), "error": answer.get("error"),
                            "len": size})
        elif method == "Lifecycle":
            victim = message.get("payload")
            send({"type": "event", "id": "shutdown", "target": "*"})
            send({"type": "event", "id": "shutdown", "target": victim,
                  "source": "broker"})
            send({"type": "event", "id": "ready", "target": f"{victim}.0"})
            reply(message, "sent")
        elif method == "Forge":
            send({"type": "request", "id": "Echo", "correlation_id": 5,
                  "source": "victim.0", "target": "echo", "payload": "forged"})
            send({"type": "response", "id": "Nothing", "correlation_id": 424242,
                  "target": "@caller", "payload": None})
            answer = wait_for(5)
            reply(message, {"target": answer.get("target"),
                            "payload": answer.get("payload")})


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        pass
