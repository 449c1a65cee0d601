"""Every bad input a service must survive, each against a real child over
its pipes: torn and oversized frames, bodies that are not envelopes, stray
replies, handlers that throw, block past their deadline or ignore their
cancel, 10 000 calls in flight, 8 MiB payloads."""

import os
import struct
import time

import msgpack

from conftest import frame, packb

SERVICE = """
    import threading, time
    from procbroker import CallError, Service

    svc = Service()
    state = {"late_done": 0}

    @svc.method("Add")
    def add(payload):
        return payload[0] + payload[1]

    @svc.method("AddLater")
    async def add_later(payload):
        return payload[0] + payload[1]

    @svc.method("Boom")
    def boom(payload):
        raise ValueError("boom " + str(payload))

    @svc.method("AsyncBoom")
    async def async_boom(payload):
        raise KeyError("missing")

    @svc.method("Stubborn")
    def stubborn(payload, ctx):
        # Ignores its deadline and its cancel.
        time.sleep(payload["s"])
        state["late_done"] += 1
        return "done late"

    @svc.method("LateDone", inline=True)
    def late_done(_):
        return state["late_done"]

    @svc.method("Size")
    def size(payload):
        return len(payload)

    svc.run()
"""


def test_a_frame_cut_in_the_middle_then_eof(service):
    s = service(SERVICE)
    cid = s.request("Add", [1, 2])
    assert s.recv().payload == 3
    body = packb({"type": "request", "id": "Add", "correlation_id": cid + 1, "source": "c.0", "target": s.id,
                  "payload": [1, 2]})
    s.write(frame(body)[:10])
    s.close_stdin()
    started = time.monotonic()
    code = s.wait_exit(3)
    assert time.monotonic() - started < 1.0
    assert code != 0
    assert "stdin is out of sync" in s.stderr() and "ended inside a frame" in s.stderr()
    s.no_frame(0.2)


def test_a_length_over_the_limit(service):
    s = service(SERVICE)
    s.write(struct.pack(">I", 16 * 1024 * 1024 + 1) + b"\x80")
    code = s.wait_exit(3)
    assert code != 0
    assert "not within 1..16777216" in s.stderr()


def test_bodies_that_are_not_envelopes_are_skipped_and_logged(service):
    s = service(SERVICE)
    for body in (b"\xc1", packb([1, 2]), packb("hello"), packb({"type": "request"}) + b"\x00"):
        s.write(frame(body))
    assert s.call("Add", [2, 3]).payload == 5
    err = s.stderr()
    assert "skipping a bad frame: not MessagePack" in err
    assert "skipping a bad frame: not a map but an array" in err
    assert "skipping a bad frame: not a map but a str" in err
    assert "bytes after the envelope" in err


def test_a_request_with_bad_fields_is_answered_bad_request_when_it_can_be(service):
    s = service(SERVICE)
    s.send({"type": "request", "id": "Add", "correlation_id": 9, "source": "c.0", "target": s.id,
            "timeout_ms": "soon", "payload": [1, 2]})
    reply = s.recv()
    assert (reply["type"], reply["correlation_id"], reply["target"], reply["code"]) == ("error", 9, "c.0", "bad_request")
    assert "timeout_ms" in reply["error"]
    s.send({"type": "request", "id": "", "correlation_id": 10, "source": "c.0", "target": s.id})
    reply = s.recv()
    assert (reply["correlation_id"], reply["code"]) == (10, "bad_request")
    s.send({"type": "request", "id": "Add", "correlation_id": 11, "source": "c.0", "target": s.id, "stream": 1})
    assert s.recv()["code"] == "bad_request"
    # No correlation id or no source to answer to: logged only.
    s.send({"type": "request", "id": "Add", "correlation_id": -1, "source": "c.0", "target": s.id})
    s.send({"type": "request", "id": "Add", "correlation_id": "12", "source": "c.0", "target": s.id})
    s.send({"type": "request", "id": "Add", "correlation_id": 12, "target": s.id})
    assert s.call("Add", [1, 1]).payload == 2
    assert s.stderr().count("without a valid correlation_id and source") == 3


def test_an_unknown_type_is_skipped(service):
    s = service(SERVICE)
    s.send({"type": "telegram", "id": "Add", "correlation_id": 1, "source": "c.0", "target": s.id})
    s.send({"id": "Add", "correlation_id": 2, "source": "c.0", "target": s.id})
    assert s.call("Add", [1, 2]).payload == 3
    assert "unknown type 'telegram'" in s.stderr() and "unknown type None" in s.stderr()


def test_a_reply_for_an_unknown_correlation_id_is_dropped(service):
    s = service(SERVICE)
    s.send({"type": "response", "id": "X", "correlation_id": 424242, "source": "other.0", "target": s.id,
            "payload": 1})
    s.send({"type": "error", "id": "X", "correlation_id": 7, "source": "broker", "target": s.id,
            "code": "timeout", "error": "late"})
    s.send({"type": "response", "id": "X", "correlation_id": "seven", "source": "broker", "target": s.id})
    s.send({"type": "response", "id": "X", "correlation_id": 5, "source": "b", "target": s.id, "more": True})
    assert s.call("Add", [4, 4]).payload == 8
    s.no_frame(0.2)


def test_a_handler_that_throws_answers_handler_and_the_service_goes_on(service):
    s = service(SERVICE)
    reply = s.call("Boom", 7)
    assert (reply["type"], reply["code"], reply["error"]) == ("error", "handler", "ValueError: boom 7")
    reply = s.call("AsyncBoom")
    assert (reply["code"], reply["error"]) == ("handler", "KeyError: 'missing'")
    reply = s.call("Add", {"x": 1})  # KeyError inside
    assert reply["code"] == "handler"
    assert s.call("AddLater", [2, 2]).payload == 4
    assert "handler Boom failed" in s.stderr() and "ValueError: boom 7" in s.stderr()


def test_a_handler_that_blocks_past_its_deadline(service):
    s = service(SERVICE)
    cid = s.request("Stubborn", {"s": 0.6}, timeout_ms=100)
    # The others are served meanwhile.
    assert s.call("Add", [1, 2]).payload == 3
    time.sleep(0.15)
    s.cancel(cid, reason="timeout")  # what the broker sends at the deadline
    assert s.call("AddLater", [1, 2]).payload == 3
    time.sleep(0.6)
    assert s.call("LateDone").payload == 1
    s.no_frame(0.2)  # its reply, after the cancel, is not sent

    # Without a cancel (a broker of protocol v1), the late reply goes out.
    cid = s.request("Stubborn", {"s": 0.2}, timeout_ms=50)
    reply = s.recv(2)
    assert (reply["correlation_id"], reply.payload) == (cid, "done late")


def test_a_handler_that_ignores_cancel_does_not_hold_the_process_at_eof(service):
    s = service(SERVICE)
    cid = s.request("Stubborn", {"s": 30})
    time.sleep(0.1)
    s.cancel(cid, reason="cancelled")
    assert s.call("Add", [1, 2]).payload == 3
    s.close_stdin()
    started = time.monotonic()
    s.wait_exit(3)
    assert time.monotonic() - started < 1.0
    assert "exiting with 1 handler(s) still running" in s.stderr()


def test_ten_thousand_calls_in_flight_from_one_client(service):
    s = service(SERVICE)
    n = 10000
    data = bytearray()
    for cid in range(1, n + 1):
        method = "Add" if cid % 2 else "AddLater"
        data += frame(packb({"type": "request", "id": method, "correlation_id": cid, "source": "client.0",
                             "target": s.id, "timeout_ms": 30000, "payload": [cid, 1]}))
    s.write(bytes(data))
    seen = {}
    for _ in range(n):
        reply = s.recv(20)
        cid = reply["correlation_id"]
        assert cid not in seen
        seen[cid] = reply.payload
    assert seen == {cid: cid + 1 for cid in range(1, n + 1)}
    s.no_frame(0.2)


def test_a_payload_of_8_mib_to_a_handler_that_decodes_it(service):
    s = service(SERVICE)
    blob = os.urandom(8 * 1024 * 1024)
    reply = s.call("Size", blob, timeout=30)
    assert reply.payload == len(blob)
    big = ["x" * 1000] * 8000
    assert s.call("Size", big, timeout=30).payload == 8000
    assert msgpack.packb(big).__len__() > 8_000_000
