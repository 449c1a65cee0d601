"""The conformance subject over its real pipes, the test playing the broker:
the handshake, every method of the conformance table, deadlines, cancel,
streams, calls out, events, drain and EOF."""

import os
import time

import msgpack

U64_MAX = 2**64 - 1


def test_ready_then_ping_and_u64_correlation_ids(subject):
    s = subject()
    for cid in (0, 1, 2**32, 2**53 + 1, U64_MAX):
        reply = s.call("Ping", cid=cid, source="broker")
        assert (reply["type"], reply["id"], reply["target"], reply["correlation_id"]) == ("response", "Ping", "broker", cid)
        assert reply.payload == {}


def test_echo_carries_payload_bytes_verbatim(subject):
    s = subject()
    payloads = [
        msgpack.packb({"name": "test", "value": 123}),
        b"\xc0", b"\xc2", b"\xc3", b"\x7f", b"\xe0",
        b"\xcf" + U64_MAX.to_bytes(8, "big"), b"\xd3" + (2**63).to_bytes(8, "big"),
        b"\xce\x00\x00\x00\x01",  # 1 in a longer form than needed
        b"\xca\x3f\xc0\x00\x00", b"\xcb" + b"\x3f\xf8" + b"\x00" * 6,
        b"\xd9\x03abc", b"\xda\x00\x01z", b"\xa3\xff\xfe\xfd",  # a str that is not UTF-8
        b"\xc4\x02\x00\xff", b"\xc5\x00\x00",
        b"\xdc\x00\x01\x01", b"\xde\x00\x01\x01\x02",  # array16 / map16 of one
        b"\x81\x91\x01\x02",  # a map whose key is an array
        b"\xd4\x05\x01", b"\xd5\x05\x01\x02", b"\xc7\x03\x05abc", b"\xd6\xff\x00\x00\x00\x01",
        b"\xd7\xff" + b"\x00" * 8, b"\xc7\x0c\xff" + b"\x00" * 12,  # timestamps 32/64/96
        msgpack.packb([None, True, -1, 1.5, "s", b"b", {"k": [1, {"deep": []}]}]),
        b"\x91" * 3000 + b"\xc0",  # deeper than msgpack-python decodes
    ]
    cids = []
    for p in payloads:
        env = {"type": "request", "id": "Echo", "correlation_id": s.cid(), "source": "client.0", "target": s.id}
        body = msgpack.packb(env)
        body = bytes([body[0] + 1]) + body[1:] + b"\xa7payload" + p
        s.write(len(body).to_bytes(4, "big") + body)
        cids.append(env["correlation_id"])
    for cid, p in zip(cids, payloads):
        reply = s.recv()
        assert reply["correlation_id"] == cid and reply["type"] == "response"
        assert reply.raw_payload == p


def test_echo_without_payload_answers_without_one_and_any_key_order(subject):
    s = subject()
    reply = s.call("Echo")
    assert reply["type"] == "response" and not reply.has_payload
    cid = s.cid()
    s.send({"type": "request", "id": "Echo", "correlation_id": cid, "source": "client.0", "target": s.id,
            "payload": [1, 2]}, payload_first=True)
    reply = s.recv()
    assert reply["correlation_id"] == cid and reply.payload == [1, 2]


def test_a_payload_of_8_mib_both_ways(subject):
    s = subject()
    blob = os.urandom(8 * 1024 * 1024)
    reply = s.call("Echo", blob, timeout=30)
    assert reply.payload == blob
    reply = s.call("Count", {"n": 1}, stream=True)  # still in sync afterwards
    assert reply.payload == 0


def test_sleeps_run_concurrently(subject):
    s = subject()
    started = time.monotonic()
    cids = {s.request("Sleep", {"ms": 200}) for _ in range(8)}
    for _ in range(8):
        reply = s.recv(3)
        cids.remove(reply["correlation_id"])
        assert reply.payload["cancelled"] is False and reply.payload["slept_ms"] >= 190
    assert time.monotonic() - started < 0.6
    assert s.call("Active").payload == {"sleeping": 0}


def test_deadline_is_the_budget_left_in_whole_ms(subject):
    s = subject()
    left = s.call("Deadline", timeout_ms=1500).payload
    assert isinstance(left, int) and 1400 <= left <= 1499
    reply = s.call("Deadline")
    assert reply.has_payload and reply.payload is None


def test_a_cancel_from_the_broker_stops_the_handler_and_its_reply(subject):
    s = subject()
    cid = s.request("Sleep", {"ms": 5000}, timeout_ms=100)
    time.sleep(0.15)
    assert s.call("Active").payload == {"sleeping": 1}
    s.cancel(cid, reason="timeout")
    t = time.monotonic()
    while s.call("Active").payload != {"sleeping": 0}:
        assert time.monotonic() - t < 0.2, "the Sleep handler did not stop within 200 ms"
    assert s.call("LastCancel").payload == {"correlation_id": cid, "reason": "timeout"}
    s.no_frame(0.3)  # the cancelled request gets no reply


def test_a_cancel_names_its_request_by_source_and_id(subject):
    s = subject()
    mine = s.request("Sleep", {"ms": 400}, source="client.0", cid=77)
    other = s.request("Sleep", {"ms": 400}, source="client.1", cid=77)
    s.cancel(77, source="client.1", reason="caller_exited")
    s.cancel(12345, source="client.0")  # no such request: ignored
    s.event("cancel", {"source": "client.0", "reason": "cancelled"}, source="client.9", correlation_id=77)
    reply = s.recv(3)
    assert (reply["correlation_id"], reply["target"]) == (mine, "client.0")
    assert reply.payload["cancelled"] is False
    assert s.call("LastCancel").payload == {"correlation_id": other, "reason": "caller_exited"}
    s.no_frame(0.2)


def test_count_streams_only_when_asked(subject):
    s = subject()
    cid = s.request("Count", {"n": 4, "delay_ms": 5}, stream=True)
    parts = [s.recv() for _ in range(5)]
    assert all(p["correlation_id"] == cid for p in parts)
    assert [p.get("more") for p in parts] == [True, True, True, True, None]
    assert [p.payload for p in parts] == [0, 1, 2, 3, 4]
    reply = s.call("Count", {"n": 4})
    assert reply.get("more") is None and reply.payload == 4
    assert s.call("Count", {"n": 0}, stream=True).payload == 0


def test_a_cancelled_stream_stops(subject):
    s = subject()
    cid = s.request("Count", {"n": 1000, "delay_ms": 20}, stream=True)
    assert s.recv().payload == 0
    s.cancel(cid, reason="busy")
    time.sleep(0.1)
    while not s.frames.empty():  # partials already on their way
        assert s.recv().get("more") is True
    s.no_frame(0.2)
    assert s.call("LastCancel").payload == {"correlation_id": cid, "reason": "busy"}


def test_fail_replies_its_code_and_message(subject):
    s = subject()
    reply = s.call("Fail", {"code": "out_of_stock", "message": "no more"})
    assert (reply["type"], reply["code"], reply["error"]) == ("error", "out_of_stock", "no more")
    reply = s.call("Fail", {"message": "plain"})
    assert (reply["type"], reply["code"], reply["error"]) == ("error", "handler", "plain")
    reply = s.call("Fail", [1])  # not the payload Fail takes: the handler throws
    assert (reply["type"], reply["code"]) == ("error", "handler")
    assert s.call("Ping").payload == {}


def test_unknown_method_and_bad_payloads(subject):
    s = subject()
    reply = s.call("Nope")
    assert (reply["type"], reply["code"]) == ("error", "unknown_method")
    env = {"type": "request", "id": "Sleep", "correlation_id": 5, "source": "c.0", "target": s.id}
    body = msgpack.packb(env)
    body = bytes([body[0] + 1]) + body[1:] + b"\xa7payload" + b"\x81\x91\x01\x02"  # an array as a map key
    s.write(len(body).to_bytes(4, "big") + body)
    reply = s.recv()
    assert (reply["correlation_id"], reply["code"]) == (5, "bad_request")


def test_who_am_i(subject):
    s = subject(process_id="subject.3")
    assert s.call("WhoAmI").payload == {"id": "subject.3", "pid": s.proc.pid}


def test_relay_calls_through_the_broker_with_the_budget_left(subject):
    s = subject()
    cid = s.request("Relay", {"target": "echo", "method": "Echo", "payload": b"\xce\x00\x00\x00\x01"},
                    timeout_ms=2000)
    inner = s.recv()
    assert (inner["type"], inner["target"], inner["id"]) == ("request", "echo", "Echo")
    assert 1500 <= inner["timeout_ms"] <= 2000
    assert inner.payload == b"\xce\x00\x00\x00\x01"
    # The broker answers it; the payload must come back byte for byte.
    s.send({"type": "response", "id": "Echo", "correlation_id": inner["correlation_id"], "source": "echo.0",
            "target": s.id, "payload": msgpack.ExtType(3, b"xyz")})
    reply = s.recv()
    assert reply["correlation_id"] == cid and reply.payload == msgpack.ExtType(3, b"xyz")

    cid = s.request("Relay", {"target": "nowhere", "method": "X"})
    inner = s.recv()
    assert not inner.has_payload and inner["timeout_ms"] == 30000
    s.send({"type": "error", "id": "X", "correlation_id": inner["correlation_id"], "source": "broker",
            "target": s.id, "code": "unknown_target", "error": "no process or service \"nowhere\""})
    reply = s.recv()
    assert (reply["correlation_id"], reply["code"], reply["error"]) == (
        cid, "unknown_target", "no process or service \"nowhere\"")


def test_a_cancelled_relay_cancels_its_call(subject):
    s = subject()
    cid = s.request("Relay", {"target": "slow", "method": "Sleep", "payload": {"ms": 5000}})
    inner = s.recv()
    s.cancel(cid, reason="cancelled")
    cancel = s.recv()
    assert (cancel["type"], cancel["id"], cancel["target"], cancel["correlation_id"]) == (
        "event", "cancel", "broker", inner["correlation_id"])
    s.no_frame(0.3)  # and no reply to the cancelled Relay
    assert s.call("LastCancel").payload == {"correlation_id": cid, "reason": "cancelled"}


def test_relay_gives_up_past_its_deadline_and_grace(subject):
    s = subject()
    started = time.monotonic()
    cid = s.request("Relay", {"target": "mute", "method": "M"}, timeout_ms=300)
    inner = s.recv()
    # Nobody answers the inner call: the subject gives up on it (and tells
    # the broker), then answers `timeout`.
    cancel = s.recv(5)
    assert (cancel["type"], cancel["id"], cancel["correlation_id"]) == ("event", "cancel", inner["correlation_id"])
    reply = s.recv()
    assert (reply["correlation_id"], reply["code"]) == (cid, "timeout")
    assert 1.2 <= time.monotonic() - started < 3


def test_events_both_ways(subject):
    s = subject()
    assert s.call("LastNote").payload is None
    s.event("note", {"n": 1}, source="client.4")
    assert s.call("LastNote").payload == {"n": 1}
    s.event("note", source="client.4")
    reply = s.call("LastNote")
    assert reply.has_payload and reply.payload is None
    cid = s.request("Notify", {"target": "client.7", "event": "hello", "payload": [b"\x00"]})
    event = s.recv()  # the event goes out before the reply
    assert (event["type"], event["id"], event["target"], event.payload) == ("event", "hello", "client.7", [b"\x00"])
    reply = s.recv()
    assert reply["correlation_id"] == cid and reply.has_payload and reply.payload is None


def test_twenty_thousand_pipelined_calls_one_reply_each(subject):
    s = subject()
    n = 20000
    data = bytearray()
    for cid in range(1, n + 1):
        body = msgpack.packb({"type": "request", "id": "Echo", "correlation_id": cid, "source": "client.0",
                              "target": s.id, "payload": cid})
        data += len(body).to_bytes(4, "big") + body
    s.write(bytes(data))
    seen = set()
    for _ in range(n):
        reply = s.recv(10)
        assert reply.payload == reply["correlation_id"]
        seen.add(reply["correlation_id"])
    assert len(seen) == n
    s.no_frame(0.2)


def test_shutdown_from_another_source_is_ignored(subject):
    s = subject()
    s.event("shutdown", source="client.0")
    s.event("shutdown", source="brokers")
    time.sleep(0.2)
    assert s.proc.poll() is None
    assert s.call("Ping").payload == {}
    assert "ignoring shutdown from 'client.0'" in s.stderr()


def test_shutdown_from_the_broker_drains_then_exits(subject):
    s = subject()
    sleeps = {s.request("Sleep", {"ms": 300}) for _ in range(3)}
    s.event("shutdown", source="broker")
    late = s.request("Echo", 1)
    refused = s.recv()
    assert (refused["correlation_id"], refused["code"]) == (late, "shutting_down")
    for _ in range(3):
        reply = s.recv(3)
        sleeps.remove(reply["correlation_id"])
        assert reply.payload["cancelled"] is False
    # Drained: it exits with stdin still open.
    assert s.wait_exit(3) == 0


def test_shutdown_with_nothing_in_flight_exits_at_once(subject):
    s = subject()
    s.event("shutdown", source="broker")
    assert s.wait_exit(2) == 0


def test_eof_exits_within_a_second_even_with_a_handler_running(subject):
    s = subject()
    cid = s.request("Sleep", {"ms": 10000})
    time.sleep(0.1)
    s.close_stdin()
    started = time.monotonic()
    code = s.wait_exit(3)
    assert time.monotonic() - started < 1.0
    assert code == 0
    # The handler saw its cancellation (shutting_down) and still answered.
    reply = s.recv()
    assert reply["correlation_id"] == cid and reply.payload["cancelled"] is True


def test_nothing_but_frames_on_stdout(subject):
    s = subject()
    for i in range(50):
        s.request("Echo", i)
        s.request("Count", {"n": 3}, stream=True)
        s.request("Nope")
    for _ in range(50 * 6):
        s.recv()
    s.close_stdin()
    assert s.wait_exit(3) == 0
    assert s.frames.get(timeout=2) is None  # a clean EOF: no torn frame
    assert s.stdout_error is None
