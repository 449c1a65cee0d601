#!/usr/bin/env python3
"""A worker, and a caller, for the request-lifecycle tests (tests/lifecycle.rs).

Plain Python and msgpack: it speaks protocol v1.1 by hand, frame by frame,
so the tests see exactly what goes over the pipe. One event loop: stdin is
read whenever it has data, timers (sleeps, stream pacing) fire in between,
so a `cancel` reaches a request that is still running.

As a worker (each a request):
  Echo          reply with the payload
  Ping          reply {} (the health check)
  Deadline      reply with the request's `timeout_ms` (nil if it had none)
  Seen          reply {method: timeout_ms} of the last request of each method
  Key           reply with the request's `key` and `stream` as [key, stream]
  Sleep {ms, reply_after_cancel}
                reply {slept_ms, cancelled: false} after `ms`; a `cancel`
                from the broker ends it early: remembered, and no reply
                unless `reply_after_cancel` (then {cancelled: true}, which
                the broker drops as late)
  Active        reply {sleeping, streaming}: Sleeps and streams still running
  LastCancel    reply {correlation_id, reason, source} of the last `cancel`
                from the broker that named a running request, or nil
  Cancels       reply every `cancel` from the broker, in order
  Count {n, delay_ms, size, for_ms, ignore_cancel}
                to a request with `stream`: partial replies 0 … n-1 (each
                {i, pad} with `size` bytes of padding if `size`), `delay_ms`
                apart, then the final reply n. `for_ms`: stream for that long
                instead of n partials. A `cancel` stops it (remembered)
                unless `ignore_cancel`. Without `stream`: only the final.
  Partials {n}  n replies with `more = true` whatever the request asked, then
                the final reply "done"
  AfterFinal {n}
                the final reply "final", then n replies with `more = true`

As a caller:
  Call {target, method, payload, cid, key, stream, timeout_ms,
        cancel_after_ms, stall_ms, linger_ms, summary}
                sends that request (`cid` as its correlation id, `key`,
                `stream`, `timeout_ms` only if given), collects its partial
                replies and its final reply, and answers {partials, type,
                code, error, payload, source, extra, cancel_to_reply_ms}.
                `cancel_after_ms`: sends `cancel` to `broker` for it that
                much later. `stall_ms`: reads nothing at all (stdin left
                unread) for that long after sending it. `linger_ms`: after
                the final reply, waits that long and counts in `extra` the
                frames for it that still came. `summary`: {count, in_order}
                instead of the partials themselves.
  Send {envelope}
                writes the envelope as given (a forged `cancel`, …); reply
                "sent"

With LIFECYCLE_RPC=1 it speaks MessagePack-RPC instead (no `ready`, no
envelopes): `hold` is never answered, `notifications` is answered with
every notification received so far as [method, params], anything else
with its params.

With LIFECYCLE_CALL set to the JSON of a Call's payload, it makes that call
on its own once ready and writes "call result JSON" to stderr.
Every `cancel` from the broker is logged to stderr as "cancel CID REASON
SOURCE". With LIFECYCLE_LOG=FILE, "cancel CID REASON", "shutdown" and "eof"
lines are appended to FILE as they happen (with CLOCK_MONOTONIC ns).
"""
import heapq
import itertools
import json
import os
import select
import struct
import sys
import time

import msgpack

ID = os.environ.get("PROCBROKER_PROCESS_ID", "lifecycle")
LOG = os.environ.get("LIFECYCLE_LOG")
OUT = sys.stdout.buffer


def log(message):
    print(f"[{ID}] {message}", file=sys.stderr, flush=True)


def record(what):
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{ID} {what} {time.monotonic_ns()}\n")


def now_ms():
    return time.monotonic() * 1000.0


def send(envelope):
    body = msgpack.packb(envelope, use_bin_type=True)
    OUT.write(struct.pack(">I", len(body)) + body)
    OUT.flush()


def reply(request, payload, more=False):
    envelope = {"type": "response", "id": request["id"],
                "correlation_id": request["correlation_id"],
                "target": request["source"], "payload": payload}
    if more:
        envelope["more"] = True
    send(envelope)


class Loop:
    def __init__(self):
        self.buffer = b""
        self.timers = []
        self.seq = itertools.count()
        self.eof = False
        self.seen = {}
        # (source, correlation id) -> what a cancel of it does
        self.running = {}
        self.sleeping = 0
        self.streaming = 0
        self.last_cancel = None
        self.cancels = []
        # correlation id -> the call in flight
        self.calls = {}
        self.next_cid = 1 << 40

    # -- timers ---------------------------------------------------------
    def at(self, when_ms, action):
        entry = [when_ms, next(self.seq), action, True]
        heapq.heappush(self.timers, entry)
        return entry

    def run_due(self):
        while self.timers and self.timers[0][0] <= now_ms():
            entry = heapq.heappop(self.timers)
            if entry[3]:
                entry[2]()

    # -- reading --------------------------------------------------------
    def read_frames(self, timeout_s):
        ready, _, _ = select.select([0], [], [], timeout_s)
        if not ready:
            return []
        chunk = os.read(0, 1 << 16)
        if not chunk:
            self.eof = True
            return []
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= 4:
            (n,) = struct.unpack(">I", self.buffer[:4])
            if len(self.buffer) < 4 + n:
                break
            frames.append(msgpack.unpackb(self.buffer[4:4 + n], raw=False,
                                          strict_map_key=False))
            self.buffer = self.buffer[4 + n:]
        return frames

    def run(self):
        send({"type": "event", "id": "ready", "target": "broker"})
        spec = os.environ.get("LIFECYCLE_CALL")
        if spec:
            self.call(json.loads(spec),
                      lambda result: log("call result " + json.dumps(result)))
        while not self.eof:
            self.run_due()
            timeout = 1.0
            if self.timers:
                timeout = max(0.0, (self.timers[0][0] - now_ms()) / 1000.0)
            for message in self.read_frames(timeout):
                self.handle(message)
        record("eof")

    # -- dispatch -------------------------------------------------------
    def handle(self, message):
        kind = message.get("type")
        if kind == "request":
            self.seen[message.get("id")] = message.get("timeout_ms")
            self.serve(message)
        elif kind in ("response", "error"):
            call = self.calls.get(message.get("correlation_id"))
            if call is not None:
                call.take(message)
        elif kind == "event" and message.get("source") == "broker":
            if message.get("id") == "cancel":
                self.cancelled(message)
            elif message.get("id") == "shutdown":
                record("shutdown")

    def cancelled(self, event):
        payload = event.get("payload") or {}
        cid = event.get("correlation_id")
        reason = payload.get("reason")
        source = payload.get("source")
        log(f"cancel {cid} {reason} {source}")
        record(f"cancel {cid} {reason}")
        notice = {"correlation_id": cid, "reason": reason, "source": source}
        self.cancels.append(notice)
        on_cancel = self.running.get((source, cid))
        if on_cancel is not None:
            self.last_cancel = notice
            on_cancel()

    def serve(self, request):
        method = request.get("id")
        params = request.get("payload")
        if not isinstance(params, dict):
            params = {}
        if method == "Echo":
            reply(request, request.get("payload"))
        elif method == "Ping":
            reply(request, {})
        elif method == "Deadline":
            reply(request, request.get("timeout_ms"))
        elif method == "Seen":
            reply(request, self.seen)
        elif method == "Key":
            reply(request, [request.get("key"), request.get("stream", False)])
        elif method == "Sleep":
            self.sleep(request, params)
        elif method == "Active":
            reply(request, {"sleeping": self.sleeping, "streaming": self.streaming})
        elif method == "LastCancel":
            reply(request, self.last_cancel)
        elif method == "Cancels":
            reply(request, self.cancels)
        elif method == "Count":
            self.count(request, params)
        elif method == "Partials":
            for i in range(params.get("n", 1)):
                reply(request, i, more=True)
            reply(request, "done")
        elif method == "AfterFinal":
            reply(request, "final")
            for i in range(params.get("n", 1)):
                reply(request, i, more=True)
        elif method == "Call":
            self.call(params, lambda result: reply(request, result))
        elif method == "Send":
            send(params["envelope"])
            reply(request, "sent")
        else:
            send({"type": "error", "id": method,
                  "correlation_id": request["correlation_id"],
                  "target": request["source"], "code": "unknown_method",
                  "error": f"no method {method!r}"})

    # -- worker methods ---------------------------------------------------
    def sleep(self, request, params):
        key = (request["source"], request["correlation_id"])
        started = now_ms()
        self.sleeping += 1

        def finish(cancelled):
            self.running.pop(key, None)
            self.sleeping -= 1
            if not cancelled or params.get("reply_after_cancel"):
                reply(request, {"slept_ms": int(now_ms() - started),
                                "cancelled": cancelled})

        timer = self.at(started + params.get("ms", 0), lambda: finish(False))

        def on_cancel():
            timer[3] = False
            finish(True)

        self.running[key] = on_cancel

    def count(self, request, params):
        n = params.get("n", 0)
        if not request.get("stream"):
            reply(request, n)
            return
        key = (request["source"], request["correlation_id"])
        delay = params.get("delay_ms", 0)
        size = params.get("size", 0)
        until = now_ms() + params["for_ms"] if "for_ms" in params else None
        pad = b"p" * size
        state = {"i": 0, "timer": None}
        self.streaming += 1

        def done(final):
            self.running.pop(key, None)
            self.streaming -= 1
            if final:
                reply(request, state["i"])
            log(f"streamed {state['i']} partials of {size} bytes")

        def step():
            # A few partials a turn, so that stdin is read in between.
            for _ in range(16):
                over = now_ms() >= until if until is not None else state["i"] >= n
                if over:
                    done(True)
                    return
                i = state["i"]
                reply(request, {"i": i, "pad": pad} if size else i, more=True)
                state["i"] = i + 1
                if delay:
                    break
            state["timer"] = self.at(now_ms() + delay, step)

        def on_cancel():
            if params.get("ignore_cancel"):
                return
            if state["timer"] is not None:
                state["timer"][3] = False
            done(False)

        self.running[key] = on_cancel
        step()

    # -- caller ---------------------------------------------------------
    def call(self, params, answer):
        cid = params.get("cid")
        if cid is None:
            self.next_cid += 1
            cid = self.next_cid
        request = {"type": "request", "id": params["method"],
                   "correlation_id": cid, "target": params["target"],
                   "payload": params.get("payload")}
        for field in ("key", "stream", "timeout_ms"):
            if field in params:
                request[field] = params[field]
        call = Call(self, cid, params, answer)
        self.calls[cid] = call
        send(request)
        if "cancel_after_ms" in params:
            self.at(now_ms() + params["cancel_after_ms"], call.cancel)
        if params.get("stall_ms"):
            # Reads nothing: the broker's frames for it pile up.
            time.sleep(params["stall_ms"] / 1000.0)


class Call:
    def __init__(self, loop, cid, params, answer):
        self.loop, self.cid, self.params, self.answer = loop, cid, params, answer
        self.partials = []
        self.final = None
        self.extra = 0
        self.cancel_at = None

    def cancel(self):
        if self.final is None:
            self.cancel_at = now_ms()
            send({"type": "event", "id": "cancel", "target": "broker",
                  "correlation_id": self.cid})

    def take(self, message):
        if self.final is not None:
            self.extra += 1
            return
        if message.get("type") == "response" and message.get("more"):
            self.partials.append(message.get("payload"))
            return
        self.final = message
        linger = self.params.get("linger_ms")
        if linger:
            self.loop.at(now_ms() + linger, self.done)
        else:
            self.done()

    def done(self):
        self.loop.calls.pop(self.cid, None)
        final = self.final
        result = {"type": final.get("type"), "code": final.get("code"),
                  "error": final.get("error"), "payload": final.get("payload"),
                  "source": final.get("source"), "extra": self.extra,
                  "correlation_id": self.cid}
        if self.cancel_at is not None:
            result["cancel_to_reply_ms"] = now_ms() - self.cancel_at
        if self.params.get("summary"):
            numbers = [p["i"] if isinstance(p, dict) else p for p in self.partials]
            result["partials"] = {"count": len(numbers),
                                  "in_order": numbers == list(range(len(numbers)))}
        else:
            result["partials"] = self.partials
        self.answer(result)


def rpc():
    unpacker = msgpack.Unpacker(raw=False)
    notifications = []
    while True:
        chunk = sys.stdin.buffer.read1(65536)
        if not chunk:
            return
        unpacker.feed(chunk)
        for message in unpacker:
            if message[0] == 2:
                notifications.append([message[1], message[2]])
            elif message[0] == 0 and message[2] != "hold":
                result = notifications if message[2] == "notifications" else message[3]
                OUT.write(msgpack.packb([1, message[1], None, result]))
                OUT.flush()


if __name__ == "__main__":
    try:
        if os.environ.get("LIFECYCLE_RPC") == "1":
            rpc()
        else:
            Loop().run()
    except BrokenPipeError:
        pass
