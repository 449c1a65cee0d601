"""Under the real broker: the conformance kit against the subject, and the
subject called through `procbroker run` by a second service written with
the SDK (the driver), whose `main` makes the calls and writes what it saw.

The broker binary is $PROCBROKER_BIN, else this checkout's
target/release/procbroker or target/debug/procbroker; these tests fail
without one.
"""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import SUBJECT, Broker, broker_bin, child_env, wait_for

DRIVER = r'''
import json, os, sys, threading, time
from procbroker import CallError, Raw, Service

svc = Service()
results = {}
notes = []
got_note = threading.Event()


@svc.method("Echo", raw=True, inline=True)
def echo(payload):
    return Raw(payload)


@svc.event("note2", inline=True)
def note2(payload, ctx):
    notes.append([payload, ctx.source])
    got_note.set()


def check(name, fn):
    try:
        results[name] = {"ok": fn()}
    except CallError as e:
        results[name] = {"error": [e.code, e.message]}
    except Exception as e:
        results[name] = {"error": ["exception", repr(e)]}


NON_CANONICAL = b"\x93\xce\x00\x00\x00\x01\xd9\x03abc\xca\x3f\x80\x00\x00"


def concurrency():
    started = time.monotonic()
    replies = [None] * 8

    def one(i):
        replies[i] = svc.call("subject.0", "Sleep", {"ms": 200})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [time.monotonic() - started, [r["cancelled"] for r in replies]]


def timeout_cancel():
    try:
        svc.call("subject.1", "Sleep", {"ms": 3000}, timeout=0.3)
        return "no timeout"
    except CallError as e:
        code = e.code
    time.sleep(0.2)
    return [code, svc.call("subject.1", "Active"), svc.call("subject.1", "LastCancel")]


def caller_cancel():
    ev = threading.Event()
    threading.Timer(0.2, ev.set).start()
    try:
        svc.call("subject.0", "Sleep", {"ms": 3000}, cancel=ev)
        return "not cancelled"
    except CallError as e:
        code = e.code
    time.sleep(0.2)
    return [code, svc.call("subject.0", "Active"), svc.call("subject.0", "LastCancel")]


def stream():
    s = svc.stream("subject", "Count", {"n": 3, "delay_ms": 10})
    return [list(s), s.final]


def pipelined():
    import asyncio

    async def many():
        return await asyncio.gather(*(svc.acall("subject", "Echo", i) for i in range(2000)))

    got = asyncio.run_coroutine_threadsafe(many(), svc.loop).result(60)
    return got == list(range(2000))


def note():
    svc.emit("subject.0", "note", {"from": "driver"})
    time.sleep(0.1)
    return svc.call("subject.0", "LastNote")


def notify():
    svc.call("subject.1", "Notify", {"target": "driver", "event": "note2", "payload": [1, "two"]})
    got_note.wait(5)
    return notes


def main(svc):
    check("echo", lambda: svc.call("subject", "Echo", Raw(NON_CANONICAL), raw=True).data.hex())
    check("echo_none", lambda: svc.call("subject", "Echo", raw=True).data)
    check("big", lambda: svc.call("subject", "Echo", b"\x01" * (8 * 1024 * 1024), timeout=30) == b"\x01" * (8 * 1024 * 1024))
    check("broker_ping", lambda: svc.call("broker", "Ping"))
    check("whoami", lambda: sorted(svc.call(f"subject.{i}", "WhoAmI")["id"] for i in range(2)))
    check("concurrency", concurrency)
    check("fail", lambda: svc.call("subject", "Fail", {"code": "nope", "message": "said no"}))
    check("unknown_method", lambda: svc.call("subject", "Nope"))
    check("relay", lambda: svc.call("subject", "Relay", {"target": "driver", "method": "Echo", "payload": {"x": 1}}))
    check("relay_error", lambda: svc.call("subject", "Relay", {"target": "nowhere", "method": "M"}))
    check("note", note)
    check("notify", notify)
    check("pipelined", pipelined)
    check("deadline", lambda: svc.call("subject", "Deadline", timeout=2))
    check("keyed", lambda: sorted({svc.call("subject", "WhoAmI", key="user-42")["id"] for _ in range(10)}))
    check("stream", stream)
    check("timeout_cancel", timeout_cancel)
    check("caller_cancel", caller_cancel)
    check("processes", lambda: sorted([p["id"], p["restarts"], p["status"]] for p in svc.call("broker", "ListProcesses")))
    path = os.environ["RESULTS"]
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.rename(path + ".tmp", path)


svc.run(main)
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The broker with two subject workers and the driver; what the driver
    saw, and the broker's exit status and log once stopped."""
    work = tmp_path_factory.mktemp("broker")
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    results = work / "results.json"
    python = sys.executable
    config = textwrap.dedent(f"""
        [broker]
        request_timeout_ms = 5000

        [admin]
        listen = ""

        [sysmon]
        interval_ms = 0

        [[service]]
        name = "subject"
        command = {json.dumps(python)}
        args = [{json.dumps(str(SUBJECT))}]
        workers = 2
        health = {{ method = "Ping", interval_ms = 200, timeout_ms = 2000, failures = 3 }}

        [[service]]
        name = "driver"
        command = {json.dumps(python)}
        args = [{json.dumps(str(driver))}]
        depends_on = ["subject"]
        env = {{ RESULTS = {json.dumps(str(results))} }}
        restart = {{ max_restarts = 0 }}
    """)
    broker = Broker(config, work)
    try:
        wait_for(lambda: results.exists() or broker.proc.poll() is not None, 120, "the driver's results")
        assert results.exists(), f"the broker exited early:\n{broker.output()}"
        seen = json.loads(results.read_text())
    finally:
        code = broker.stop()
    return {"results": seen, "code": code, "log": broker.output()}


def ok(run, name):
    got = run["results"][name]
    assert "ok" in got, f"{name}: {got['error']}"
    return got["ok"]


def error(run, name):
    got = run["results"][name]
    assert "error" in got, f"{name}: no error but {got['ok']!r}"
    return got["error"]


def test_payloads_cross_the_broker_byte_for_byte(run):
    assert ok(run, "echo") == b"\x93\xce\x00\x00\x00\x01\xd9\x03abc\xca\x3f\x80\x00\x00".hex()
    assert ok(run, "echo_none") is None
    assert ok(run, "big") is True


def test_calls_to_the_broker_and_to_each_worker(run):
    assert ok(run, "broker_ping") == {}
    assert ok(run, "whoami") == ["subject.0", "subject.1"]


def test_sleeps_to_one_worker_run_concurrently(run):
    elapsed, cancelled = ok(run, "concurrency")
    assert elapsed < 0.6 and cancelled == [False] * 8


def test_errors_keep_their_code_and_message(run):
    assert error(run, "fail") == ["nope", "said no"]
    assert error(run, "unknown_method")[0] == "unknown_method"


def test_calls_out_and_their_errors(run):
    assert ok(run, "relay") == {"x": 1}
    assert error(run, "relay_error")[0] == "unknown_target"


def test_events_both_ways(run):
    assert ok(run, "note") == {"from": "driver"}
    assert ok(run, "notify") == [[[1, "two"], "subject.1"]]


def test_two_thousand_concurrent_async_calls(run):
    assert ok(run, "pipelined") is True


def test_health_checks_are_answered(run):
    # Ping every 200 ms throughout: no worker was restarted.
    assert ok(run, "processes") == [["driver.0", 0, "ready"], ["subject.0", 0, "ready"], ["subject.1", 0, "ready"]]


def test_the_deadline_reaches_the_handler(run):
    # Needs a broker that stamps `timeout_ms` on the requests it delivers.
    left = ok(run, "deadline")
    assert isinstance(left, int) and 1000 < left <= 2000


def test_a_key_pins_its_calls_to_one_worker(run):
    assert len(ok(run, "keyed")) == 1


def test_streams_cross_the_broker(run):
    # Needs a broker that forwards partial replies.
    assert ok(run, "stream") == [[0, 1, 2], 3]


def test_a_timeout_cancels_the_handler(run):
    # Needs a broker that sends `cancel` to the worker at the deadline.
    code, active, last = ok(run, "timeout_cancel")
    assert (code, active, last["reason"]) == ("timeout", {"sleeping": 0}, "timeout")


def test_a_caller_cancel_reaches_the_handler(run):
    # Needs a broker that routes `cancel` from callers.
    code, active, last = ok(run, "caller_cancel")
    assert (code, active, last["reason"]) == ("cancelled", {"sleeping": 0}, "cancelled")


def test_the_service_stops_with_the_broker(run):
    assert run["code"] == 0, run["log"]


def test_the_conformance_kit_passes():
    """`procbroker conformance -- python3 subject.py` (the kit is part of the
    broker binary)."""
    command = [broker_bin(), "conformance", "--", sys.executable, str(SUBJECT)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_env())
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{report}"
    assert "conformance:" in report
    print(f"kit: {time.monotonic() - started:.1f} s\n{report}")
