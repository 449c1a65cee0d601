#!/usr/bin/env python3
"""Pipes Echo requests into worker programs and reports each one's CPU per call.

    python3 echo_bench.py [--calls 50000] [--inflight 64] [--payload 64] \
        NAME=COMMAND [NAME=COMMAND ...]

Each worker is started with its stdin and stdout as pipes, and this program
plays the broker: it waits for `ready`, then keeps `--inflight` requests
(`Echo`, a bin payload of `--payload` bytes) in flight until `--calls` were
answered, checking that each reply is a response. The worker's CPU time
(every thread, from /proc/PID/task/*/schedstat, nanoseconds) is read just
before the first request and just after the last reply, so start-up is not
counted. Workers run one after the other, in the order given, and the whole
list is run `--rounds` times; the report gives each worker's best and
median round (on a shared machine the spread is wide: compare medians of
many rounds, in one run).
"""
import argparse
import glob
import os
import shlex
import statistics
import struct
import subprocess
import sys
import time

import msgpack


def cpu_ns(pid):
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def user_sys(pid):
    """User and system CPU seconds of every thread (clock ticks)."""
    user = system = 0
    for path in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def frames(buf):
    """Complete frames at the front of buf, and the rest."""
    out, pos = [], 0
    while len(buf) - pos >= 4:
        (n,) = struct.unpack_from(">I", buf, pos)
        if len(buf) - pos - 4 < n:
            break
        out.append(buf[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out, buf[pos:]


def run(command, calls, inflight, payload_bytes):
    env = dict(os.environ, PROCBROKER_PROCESS_ID="bench.0", PROCBROKER_SERVICE="bench")
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    inp, out = child.stdin.fileno(), child.stdout.fileno()
    buf = b""
    got = []
    while not got:
        chunk = os.read(out, 1 << 16)
        if not chunk:
            raise SystemExit(f"{command}: exited before ready")
        got, buf = frames(buf + chunk)
    ready = msgpack.unpackb(got[0], raw=False)
    assert ready.get("id") == "ready", ready
    payload = b"\x5a" * payload_bytes
    requests = []
    for cid in range(1, calls + 1):
        body = msgpack.packb({"type": "request", "id": "Echo", "correlation_id": cid, "source": "client.0",
                              "target": "bench.0", "timeout_ms": 30000, "payload": payload})
        requests.append(struct.pack(">I", len(body)) + body)
    before = cpu_ns(child.pid)
    us_before = user_sys(child.pid)
    start = time.perf_counter()
    sent = min(inflight, calls)
    os.write(inp, b"".join(requests[:sent]))
    answered = 0
    check = 0
    while answered < calls:
        chunk = os.read(out, 1 << 18)
        if not chunk:
            raise SystemExit(f"{command}: exited after {answered} replies")
        replies, buf = frames(buf + chunk)
        answered += len(replies)
        if check < 50:  # spot checks; decoding every reply would slow the driver
            for r in replies[:5]:
                m = msgpack.unpackb(r, raw=False)
                assert m["type"] == "response" and m["payload"] == payload, m
                check += 1
        more = min(len(replies), calls - sent)
        if more:
            os.write(inp, b"".join(requests[sent:sent + more]))
            sent += more
    elapsed = time.perf_counter() - start
    after = cpu_ns(child.pid)
    us_after = user_sys(child.pid)
    child.stdin.close()
    child.wait(timeout=10)
    user = (us_after[0] - us_before[0]) / calls * 1e6
    system = (us_after[1] - us_before[1]) / calls * 1e6
    return (after - before) / calls / 1000, calls / elapsed, user, system


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50000)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("workers", nargs="+", metavar="NAME=COMMAND")
    args = ap.parse_args()
    workers = [w.split("=", 1) for w in args.workers]
    best = {}
    every = {}
    for r in range(args.rounds):
        for name, command in workers:
            us, rate, user, system = run(shlex.split(command), args.calls, args.inflight, args.payload)
            print(f"round {r + 1} {name:<14} {us:7.2f} us CPU/call ({user:.1f} user, {system:.1f} system)"
                  f"  {rate:9.0f} calls/s", file=sys.stderr)
            every.setdefault(name, []).append(us)
            if name not in best or us < best[name][0]:
                best[name] = (us, rate)
    base = best[workers[0][0]][0]
    base_median = statistics.median(every[workers[0][0]])
    print(f"{args.calls} Echo calls, {args.inflight} in flight, {args.payload}-byte payload; "
          f"best and median of {args.rounds} rounds:")
    for name, _ in workers:
        us, rate = best[name]
        median = statistics.median(every[name])
        print(f"{name:<14} best {us:6.2f} us CPU/call ({us / base:4.2f}x {workers[0][0]}), "
              f"median {median:6.2f} ({median / base_median:4.2f}x), {rate:8.0f} calls/s")


if __name__ == "__main__":
    main()
