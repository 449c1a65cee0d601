"""The SDK's API seen from a service: handler kinds and their contexts,
streaming handlers, cancellation into threads and tasks, calls, streams and
events out (made by `main`, answered by the test playing the broker)."""

import time

import msgpack

HANDLERS = """
    import asyncio, os, sys, threading, time
    from procbroker import CallError, Final, Raw, Service

    svc = Service(max_workers=1)  # still at least 16 threads
    seen = {}

    @svc.method("Ctx")
    def ctx_fields(payload, ctx):
        return {"source": ctx.source, "cid": ctx.correlation_id, "method": ctx.method,
                "raw": ctx.raw_payload, "left": ctx.remaining_ms(), "has_deadline": ctx.deadline is not None,
                "stream": ctx.stream, "key": ctx.key, "cancelled": ctx.cancelled,
                "thread": threading.current_thread().name}

    @svc.method("AsyncCtx")
    async def async_ctx(payload, ctx):
        return {"method": ctx.method, "left": ctx.remaining_ms(), "thread": threading.current_thread().name}

    @svc.method("OneArg")
    def one_arg(payload):
        return ["one", payload]

    @svc.method("RawIn", raw=True)
    def raw_in(payload, ctx):
        return [payload, payload == ctx.raw_payload]

    @svc.method("NoPayload", inline=True)
    def no_payload(payload):
        return Raw(None)

    @svc.method("Block")
    def block(payload, ctx):
        ctx.wait_cancelled(payload)
        return ctx.cancel_reason

    @svc.method("AsyncSleep")
    async def async_sleep(payload, ctx):
        try:
            await asyncio.sleep(payload)
        except asyncio.CancelledError:
            seen["async_cancel"] = ctx.cancel_reason
            raise
        return "slept"

    @svc.method("Seen", inline=True)
    def seen_(payload):
        return seen.get(payload)

    @svc.method("Gen")
    def gen(payload, ctx):
        try:
            for i in range(payload["n"]):
                if payload.get("delay"):
                    time.sleep(payload["delay"])
                yield {"i": i}
            return "end"
        finally:
            seen["gen_closed"] = ctx.cancel_reason

    @svc.method("AGen")
    async def agen(payload, ctx):
        for i in range(payload):
            await asyncio.sleep(0)
            yield i
        yield Final("the end")

    @svc.method("AGenPlain")
    async def agen_plain(payload):
        yield 1

    @svc.method("Print")
    def prints(payload):
        print("this goes to stderr, not between the frames")
        os.system("echo a child writes to stderr too")
        return "printed"

    @svc.method("CallsInline", inline=True)
    def calls_inline(payload):
        return svc.call("x", "Y")

    @svc.method("Chosen")
    async def chosen(payload):
        raise CallError("my_code", "my message")

    @svc.method("Unencodable")
    def unencodable(payload):
        return object()

    @svc.event("note")
    def note(payload, ctx):
        seen["note"] = [payload, ctx.source, ctx.method, ctx.raw_payload]

    @svc.event("anote")
    async def anote(payload, ctx):
        seen["anote"] = [payload, ctx.source, ctx.method]

    @svc.event("inote", inline=True)
    def inote(payload):
        seen["inote"] = payload

    svc.run()
"""


def test_a_context_for_sync_and_async_handlers(service):
    s = service(HANDLERS)
    reply = s.call("Ctx", [1], timeout_ms=2000, stream=True, key="k1", source="client.2")
    p = reply.payload
    assert (p["source"], p["cid"], p["method"], p["raw"]) == ("client.2", reply["correlation_id"], "Ctx", b"\x91\x01")
    assert p["has_deadline"] and 1800 <= p["left"] <= 1999
    assert (p["stream"], p["key"], p["cancelled"]) == (True, "k1", False)
    assert p["thread"].startswith("procbroker-")
    p = s.call("Ctx").payload
    assert (p["left"], p["has_deadline"], p["raw"], p["stream"], p["key"]) == (None, False, None, False, None)
    p = s.call("AsyncCtx", timeout_ms=500).payload
    assert p["method"] == "AsyncCtx" and 400 <= p["left"] <= 499 and p["thread"] == "procbroker-asyncio"


def test_payload_forms(service):
    s = service(HANDLERS)
    assert s.call("OneArg", {"a": b"\x00"}).payload == ["one", {"a": b"\x00"}]
    assert s.call("RawIn", [1, "x"]).payload == [msgpack.packb([1, "x"]), True]
    reply = s.call("NoPayload", 5)
    assert reply["type"] == "response" and not reply.has_payload
    reply = s.call("Unencodable")
    assert (reply["code"], reply["error"].startswith("the result does not encode")) == ("internal", True)
    reply = s.call("Chosen")
    assert (reply["code"], reply["error"]) == ("my_code", "my message")


def test_at_least_16_threads_whatever_max_workers_says(service):
    s = service(HANDLERS)
    started = time.monotonic()
    for _ in range(16):
        s.request("Block", 0.3)
    for _ in range(16):
        assert s.recv(3).payload is None
    assert time.monotonic() - started < 0.9


def test_cancel_reaches_a_blocked_thread_with_its_reason(service):
    s = service(HANDLERS)
    cid = s.request("Block", 10)
    time.sleep(0.1)
    s.cancel(cid, reason="caller_exited")
    s.no_frame(0.3)
    # At EOF every running handler is cancelled too, and still answers.
    cid = s.request("Block", 10)
    time.sleep(0.1)
    s.close_stdin()
    reply = s.recv(2)
    assert (reply["correlation_id"], reply.payload) == (cid, "shutting_down")
    assert s.wait_exit(2) == 0


def test_cancel_cancels_an_async_handlers_task(service):
    s = service(HANDLERS)
    cid = s.request("AsyncSleep", 10)
    time.sleep(0.1)
    s.cancel(cid, reason="timeout")
    time.sleep(0.1)
    assert s.call("Seen", "async_cancel").payload == "timeout"
    s.no_frame(0.2)
    assert s.call("AsyncSleep", 0.01).payload == "slept"


def test_a_generator_streams_only_when_asked_and_returns_the_final(service):
    s = service(HANDLERS)
    cid = s.request("Gen", {"n": 3}, stream=True)
    parts = [s.recv() for _ in range(4)]
    assert [(p["correlation_id"], p.get("more"), p.payload) for p in parts] == [
        (cid, True, {"i": 0}), (cid, True, {"i": 1}), (cid, True, {"i": 2}), (cid, None, "end")]
    reply = s.call("Gen", {"n": 3})
    assert (reply.get("more"), reply.payload) == (None, "end")


def test_a_cancelled_generator_is_closed(service):
    s = service(HANDLERS)
    cid = s.request("Gen", {"n": 100000, "delay": 0.01}, stream=True)
    s.recv()
    s.cancel(cid, reason="busy")
    time.sleep(0.2)
    while not s.frames.empty():
        assert s.recv().get("more") is True
    assert s.call("Seen", "gen_closed").payload == "busy"


def test_an_async_generator_streams_and_ends_with_final(service):
    s = service(HANDLERS)
    cid = s.request("AGen", 3, stream=True)
    parts = [s.recv() for _ in range(4)]
    assert [(p.get("more"), p.payload) for p in parts] == [(True, 0), (True, 1), (True, 2), (None, "the end")]
    assert s.call("AGen", 3).payload == "the end"
    reply = s.call("AGenPlain", stream=False)
    assert reply.has_payload and reply.payload is None


def test_a_full_stdout_holds_back_streams_but_not_reading(service):
    s = service(HANDLERS)
    s.reading.clear()  # the broker stops reading this worker's stdout
    cid = s.request("Gen", {"n": 10**6}, stream=True)
    time.sleep(0.5)  # the pipe fills, the generator waits for room
    ping = s.request("OneArg", "still reading")
    s.cancel(cid, reason="busy")  # read and acted on meanwhile
    time.sleep(0.2)
    s.reading.set()
    expected = 0
    while True:
        f = s.recv(10)
        if f["correlation_id"] == ping:
            assert f.payload == ["one", "still reading"]
            break
        assert (f["correlation_id"], f.get("more"), f.payload) == (cid, True, {"i": expected})
        expected += 1
    while not s.frames.empty():
        f = s.recv()
        assert f.payload == {"i": expected}
        expected += 1
    assert 1000 <= expected < 10**6  # it had filled the pipe, then stopped at the cancel
    assert s.call("Seen", "gen_closed").payload == "busy"


def test_print_and_children_cannot_touch_the_frames(service):
    s = service(HANDLERS)
    assert s.call("Print").payload == "printed"
    assert s.call("OneArg", 1).payload == ["one", 1]
    s.close_stdin()
    s.wait_exit(2)
    assert s.stdout_error is None
    err = s.stderr()
    assert "this goes to stderr, not between the frames" in err and "a child writes to stderr too" in err


def test_an_inline_handler_cannot_call(service):
    s = service(HANDLERS)
    reply = s.call("CallsInline")
    assert reply["code"] == "handler" and "inline handler cannot make calls" in reply["error"]


def test_event_handlers_of_each_kind(service):
    s = service(HANDLERS)
    s.event("note", {"x": 1}, source="client.1")
    s.event("anote", [2], source="client.2")
    s.event("inote", "now", source="client.3")
    s.event("unhandled", 1, source="client.3")
    assert s.call("Seen", "inote").payload == "now"
    time.sleep(0.1)
    assert s.call("Seen", "note").payload == [{"x": 1}, "client.1", "note", msgpack.packb({"x": 1})]
    assert s.call("Seen", "anote").payload == [[2], "client.2", "anote"]


CALLER = """
    import asyncio, threading, time
    from procbroker import CallError, Raw, Service

    svc = Service()

    def report(name, value):
        svc.emit("test.0", name, value)

    def outcome(fn):
        try:
            return ["ok", fn()]
        except CallError as e:
            return ["error", e.code, e.message]

    @svc.method("Go")
    def go(payload, ctx):
        scenario = SCENARIOS[payload]
        scenario()
        return "started"

    def plain():
        report("r", outcome(lambda: svc.call("echo", "Echo", {"n": 1}, timeout=2.5, key="user-1")))
        report("r", outcome(lambda: svc.call("echo", "Echo", raw=True).data))
        report("r", outcome(lambda: svc.call("nowhere", "X")))
        report("r", outcome(lambda: svc.call("echo", "Echo", key="k" * 257)))
        report("r", outcome(lambda: svc.call("mute", "M", timeout=0.2)))

    def cancel_event():
        ev = threading.Event()
        threading.Timer(0.2, ev.set).start()
        report("r", outcome(lambda: svc.call("slow", "M", cancel=ev)))

    def stream():
        s = svc.stream("counter", "Count", {"n": 2}, timeout=5)
        parts = list(s)
        report("r", [parts, s.final])
        s = svc.stream("counter", "Count")
        try:
            report("r", ["parts", list(s)])
        except CallError as e:
            report("r", ["error", e.code, e.message])
        with svc.stream("counter", "Count") as s:
            report("r", ["first", next(s)])
        # leaving the block early cancelled it

    def astreams():
        async def run():
            parts = []
            s = svc.astream("counter", "Count", 3)
            async for part in s:
                parts.append(part)
            report("r", [parts, s.final])
            report("r", await svc.acall("echo", "Echo", "async"))
            try:
                await svc.acall("nowhere", "X")
            except CallError as e:
                report("r", ["error", e.code])
            task = asyncio.ensure_future(svc.acall("slow", "M"))
            await asyncio.sleep(0.2)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                report("r", "task cancelled")
        asyncio.run_coroutine_threadsafe(run(), svc.loop)

    def behind():
        s = svc.stream("flood", "Flood")
        time.sleep(1.0)  # reads nothing meanwhile
        parts = 0
        try:
            for _ in s:
                parts += 1
        except CallError as e:
            report("r", [parts, e.code])

    @svc.method("CallTwice")
    def call_twice(payload):
        first = svc.call("echo", "Echo", 1)
        return [first, outcome(lambda: svc.call("echo", "Echo", 2))]

    SCENARIOS = {"plain": lambda: threading.Thread(target=plain).start(),
                 "cancel_event": lambda: threading.Thread(target=cancel_event).start(),
                 "stream": lambda: threading.Thread(target=stream).start(),
                 "astreams": astreams,
                 "behind": lambda: threading.Thread(target=behind).start()}

    def main(svc):
        report("main", svc.process_id)

    svc.run(main)
"""


def nxt(s, timeout=5.0):
    """The next frame the service sent, past the reply to `Go`."""
    while True:
        f = s.recv(timeout)
        if not (f["type"] == "response" and f["id"] == "Go"):
            return f


def answer(s, request, payload=..., **extra):
    env = {"type": "response", "id": request["id"], "correlation_id": request["correlation_id"],
           "source": request["target"] + ".0", "target": s.id}
    env.update(extra)
    if payload is not ...:
        env["payload"] = payload
    s.send(env)


def fail(s, request, code, message):
    s.send({"type": "error", "id": request["id"], "correlation_id": request["correlation_id"], "source": "broker",
            "target": s.id, "code": code, "error": message})


def result(s):
    f = nxt(s)
    assert (f["type"], f["id"], f["target"]) == ("event", "r", "test.0"), f
    return f.payload


def caller(service, scenario):
    s = service(CALLER, process_id="caller.0")
    f = s.recv()
    assert (f["type"], f["id"], f.payload) == ("event", "main", "caller.0")  # main runs once ready
    s.request("Go", scenario)
    return s


def test_calls_with_timeout_key_errors_and_raw(service):
    s = caller(service, "plain")
    req = nxt(s)
    assert (req["type"], req["target"], req["id"], req["timeout_ms"], req["key"], req.payload) == (
        "request", "echo", "Echo", 2500, "user-1", {"n": 1})
    answer(s, req, {"n": 1, "echoed": True})
    assert result(s) == ["ok", {"n": 1, "echoed": True}]
    req = nxt(s)
    assert not req.has_payload and req["timeout_ms"] == 30000 and "key" not in req.env
    answer(s, req, msgpack.ExtType(1, b"z"))
    assert result(s) == ["ok", msgpack.packb(msgpack.ExtType(1, b"z"))]
    req = nxt(s)
    fail(s, req, "unknown_target", "no nowhere")
    assert result(s) == ["error", "unknown_target", "no nowhere"]
    assert result(s)[:2] == ["error", "bad_request"]  # a key too long fails at once
    req = nxt(s)
    assert req["timeout_ms"] == 200
    started = time.monotonic()
    cancel = nxt(s, 3)  # unanswered: given up after its deadline and a grace
    assert (cancel["id"], cancel["target"], cancel["correlation_id"]) == ("cancel", "broker", req["correlation_id"])
    assert result(s)[:2] == ["error", "timeout"]
    assert 0.8 < time.monotonic() - started < 2


def test_a_call_cancelled_by_its_event(service):
    s = caller(service, "cancel_event")
    req = nxt(s)
    assert (req["type"], req["id"]) == ("request", "M")
    cancel = nxt(s, 2)
    assert (cancel["id"], cancel["correlation_id"]) == ("cancel", req["correlation_id"])
    assert result(s) == ["error", "cancelled", "the call was cancelled"]
    answer(s, req, "too late")  # a reply after the cancel is dropped
    s.no_frame(0.2)


def test_streams_in(service):
    s = caller(service, "stream")
    req = nxt(s)
    assert (req["id"], req["stream"], req.payload) == ("Count", True, {"n": 2})
    answer(s, req, 0, more=True)
    answer(s, req, 1, more=True)
    answer(s, req, 2)
    assert result(s) == [[0, 1], 2]
    req = nxt(s)
    answer(s, req, "a", more=True)
    fail(s, req, "busy", "cut")
    assert result(s) == ["error", "busy", "cut"]
    req = nxt(s)
    answer(s, req, "first", more=True)
    assert result(s) == ["first", "first"]
    cancel = nxt(s)  # leaving the `with` early cancelled it
    assert (cancel["id"], cancel["correlation_id"]) == ("cancel", req["correlation_id"])


def test_async_calls_and_streams(service):
    s = caller(service, "astreams")
    req = nxt(s)
    assert (req["id"], req["stream"], req.payload) == ("Count", True, 3)
    for i in range(3):
        answer(s, req, i, more=True)
    answer(s, req, 3)
    assert result(s) == [[0, 1, 2], 3]
    req = nxt(s)
    answer(s, req, "async")
    assert result(s) == "async"
    req = nxt(s)
    fail(s, req, "unknown_target", "no")
    assert result(s) == ["error", "unknown_target"]
    req = nxt(s)
    assert req["target"] == "slow"
    cancel = nxt(s, 2)  # cancelling the task cancels the call
    assert (cancel["id"], cancel["correlation_id"]) == ("cancel", req["correlation_id"])
    assert result(s) == "task cancelled"


def test_a_stream_whose_reader_falls_behind_is_cut(service):
    s = caller(service, "behind")
    req = nxt(s)
    for i in range(1200):
        answer(s, req, i, more=True)
    cancel = nxt(s, 3)
    assert (cancel["id"], cancel["correlation_id"]) == ("cancel", req["correlation_id"])
    assert result(s) == [1000, "busy"]


def test_no_new_calls_after_shutdown(service):
    s = service(CALLER, process_id="caller.0")
    s.recv()
    cid = s.request("CallTwice")
    req = s.recv()
    s.event("shutdown", source="broker")
    answer(s, req, "late but welcome")  # a call made before is still answered
    reply = s.recv()
    assert reply["correlation_id"] == cid
    assert reply.payload == ["late but welcome", ["error", "shutting_down", "the service is shutting down: no new calls"]]
    assert s.wait_exit(2) == 0  # drained
