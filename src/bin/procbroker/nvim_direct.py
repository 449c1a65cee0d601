"""The anchor of `procbroker bench --worker nvim --baseline`: a Python client
talking to `nvim --clean --embed --headless` directly over its pipes, no
broker, making the same calls (`nvim_eval("1")`) with the same number in
flight. Run by the bench as `python3 -c SCRIPT REQUESTS CONCURRENCY CPUS`
(CPUS: a comma-separated list to pin to, or "-"); prints one JSON line
shaped like the bench's own report, plus the CPU time per call of the
client and of neovim.
"""

import json
import os
import subprocess
import sys
import time

import msgpack


def cpu_us(pid):
    """utime + stime of `pid`, in microseconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1e6 / os.sysconf("SC_CLK_TCK")


def main():
    requests, concurrency, cpus = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if cpus != "-":
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    nvim = subprocess.Popen(["nvim", "--clean", "--embed", "--headless"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, inp = nvim.stdin, nvim.stdout
    unpacker = msgpack.Unpacker(raw=False)

    def replies():
        while True:
            for value in unpacker:
                yield value
            chunk = inp.read1(1 << 16)
            if not chunk:
                raise SystemExit("nvim closed its stdout")
            unpacker.feed(chunk)

    incoming = replies()
    out.write(msgpack.packb([0, 0, "nvim_get_api_info", []]))
    out.flush()
    next(incoming)

    sent_at = {}
    latencies = []
    errors = 0
    next_id = 1
    cpu_start = (cpu_us(os.getpid()), cpu_us(nvim.pid))
    start = time.perf_counter_ns()

    def send(n):
        nonlocal next_id
        batch = bytearray()
        now = time.perf_counter_ns()
        for _ in range(n):
            batch += msgpack.packb([0, next_id, "nvim_eval", ["1"]])
            sent_at[next_id] = now
            next_id += 1
        out.write(batch)
        out.flush()

    send(min(concurrency, requests))
    done = 0
    while done < requests:
        reply = next(incoming)
        now = time.perf_counter_ns()
        latencies.append(now - sent_at.pop(reply[1]))
        if reply[2] is not None:
            errors += 1
        done += 1
        if next_id <= requests:
            send(1)
    elapsed = time.perf_counter_ns() - start
    cpu = (cpu_us(os.getpid()) - cpu_start[0], cpu_us(nvim.pid) - cpu_start[1])
    out.close()
    nvim.wait(timeout=10)

    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]
    print(json.dumps({
        "ok": requests - errors,
        "errors": errors,
        "elapsed_ns": elapsed,
        "latency_ns": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
                       "max": latencies[-1]},
        "cpu_us_per_call": {"client": cpu[0] / requests, "workers": cpu[1] / requests},
    }))


main()
