"""Frames and envelopes: reading frames off a real pipe, the envelope
decoder's fast and slow ways agreeing, and the hand-made encoders writing
what msgpack itself would read back."""

import os
import struct
import threading

import msgpack
import pytest

from procbroker import _wire
from procbroker._wire import BadEnvelope, FrameError, FrameReader, Raw, decode_envelope

U64_MAX = 2**64 - 1


def frame(body):
    return struct.pack(">I", len(body)) + body


def read_all(data, chunks=None, max_frame=_wire.DEFAULT_MAX_FRAME_BYTES):
    """Frames read from a pipe that `data` goes into (in `chunks`-byte
    writes when given), until EOF."""
    r, w = os.pipe()

    def writer():
        try:
            if chunks:
                for i in range(0, len(data), chunks):
                    os.write(w, data[i:i + chunks])
            else:
                view = memoryview(data)
                while view:
                    n = os.write(w, view)
                    view = view[n:]
        finally:
            os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    reader = FrameReader(r, max_frame)
    got = []
    try:
        while True:
            frames = reader.read()
            if frames is None:
                return got
            got.extend(frames)
    finally:
        t.join()
        os.close(r)


def test_frames_split_anywhere_come_out_whole():
    bodies = [packed for packed in (msgpack.packb({"n": i, "pad": b"x" * (i * 37 % 300)}) for i in range(200))]
    data = b"".join(frame(b) for b in bodies)
    assert read_all(data, chunks=1) == bodies
    assert read_all(data, chunks=7) == bodies
    assert read_all(data) == bodies


def test_a_frame_larger_than_the_read_buffer_and_8_mib():
    big = msgpack.packb(os.urandom(8 * 1024 * 1024))
    small = msgpack.packb("after")
    assert read_all(frame(small) + frame(big) + frame(small), chunks=300_000) == [small, big, small]


def test_a_length_over_the_limit_is_refused_before_reading_the_body():
    r, w = os.pipe()
    os.write(w, struct.pack(">I", 1025) + b"abc")
    with pytest.raises(FrameError, match="not within 1..1024"):
        FrameReader(r, 1024).read()
    os.write(w, b"")
    os.close(w)
    os.close(r)


def test_a_zero_length_is_refused():
    with pytest.raises(FrameError, match="frame length 0"):
        read_all(struct.pack(">I", 0))


@pytest.mark.parametrize("cut", [2, 4, 9])
def test_eof_inside_a_frame_is_an_error_and_a_clean_eof_is_not(cut):
    data = frame(msgpack.packb({"a": "bcdefgh"}))
    with pytest.raises(FrameError, match="ended inside a frame"):
        read_all(data[:cut])
    assert read_all(b"") == []


def test_eof_inside_a_big_frame():
    body = msgpack.packb(b"z" * 600_000)
    with pytest.raises(FrameError, match="ended inside a frame"):
        read_all(frame(body)[:400_000])


def envelope_body(env, payload_first=False):
    env = dict(env)
    if "payload" in env and payload_first:
        env = {"payload": env.pop("payload"), **env}
    return msgpack.packb(env)


CASES = [
    {"type": "request", "id": "Echo", "correlation_id": 7, "source": "c.0", "target": "e", "payload": {"a": [1, 2]}},
    {"type": "request", "id": "Echo", "correlation_id": U64_MAX, "source": "c.0", "target": "e"},
    {"type": "response", "id": "X", "correlation_id": 1, "target": "c.0", "more": True, "payload": None},
    {"type": "event", "id": "note", "source": "c.0", "target": "e", "payload": "payload"},
    # The payload holds the bytes of the key "payload" itself.
    {"type": "request", "id": "E", "correlation_id": 3, "source": "c.0", "target": "e",
     "payload": {"payload": {"payload": 1}}},
    # Values before the payload hold them too (a routing key is any str, a
    # correlation id any u64).
    {"type": "request", "id": "E", "correlation_id": 3, "source": "c.0", "target": "e", "key": "\u00a7payload",
     "payload": 5},
    {"type": "request", "id": "E", "correlation_id": 3, "source": "c.0", "target": "e", "key": "\u00a7payload\u00c0",
     "payload": [1]},
    {"type": "request", "id": "E", "correlation_id": 3, "source": "c.0", "target": "e",
     "x": ["payload", None], "payload": b"\xc0"},
    {"type": "request", "id": "E", "correlation_id": int.from_bytes(b"\xa7payload", "big"), "source": "c.0",
     "target": "e", "payload": b"\xc0"},
    {"type": "request", "id": "payload", "correlation_id": 3, "source": "c.0", "target": "e", "payload": 1},
    {"type": "request", "id": "E", "correlation_id": 3, "source": "c.0", "target": "e", "f": 1.5,
     "b": b"\xa7payload", "t": msgpack.Timestamp(5), "payload": {"x": [1]}},
]


@pytest.mark.parametrize("env", CASES)
@pytest.mark.parametrize("payload_first", [False, True])
def test_the_decoder_splits_header_and_payload_bytes_exactly(env, payload_first):
    head, raw, value = decode_envelope(envelope_body(env, payload_first))
    # Other keys than the envelope's may be dropped.
    assert {k: v for k, v in head.items() if k in _wire.ENVELOPE_KEYS} == {
        k: v for k, v in env.items() if k in _wire.ENVELOPE_KEYS}
    if "payload" in env:
        assert raw == msgpack.packb(env["payload"]) and value == env["payload"]
    else:
        assert raw is None and value is None


def test_a_payload_python_cannot_hold_is_still_carried():
    payload = b"\x81\x91\x01\x02"  # a map whose key is an array
    body = msgpack.packb({"type": "request", "id": "E", "correlation_id": 1, "source": "c", "target": "e"})
    body = bytes([body[0] + 1]) + body[1:] + b"\xa7payload" + payload
    head, raw, value = decode_envelope(body)
    assert (head["id"], raw, value) == ("E", payload, _wire.NOT_DECODED)


@pytest.mark.parametrize("depth", [10, 1100, 100_000])
def test_a_payload_nested_deeper_than_msgpack_decodes_is_still_carried(depth):
    payload = b"\x91" * depth + b"\x81\xa1k\xc0"
    body = msgpack.packb({"type": "request", "id": "E", "correlation_id": 1, "source": "c", "target": "e"})
    body = bytes([body[0] + 1]) + body[1:] + b"\xa7payload" + payload
    head, raw, value = decode_envelope(body)
    assert (head["id"], raw) == ("E", payload)
    assert (value is _wire.NOT_DECODED) == (depth > 1000)
    # And with the payload first (the slow way).
    body = b"\x86\xa7payload" + payload + msgpack.packb(head)[1:]
    head2, raw2, _ = decode_envelope(body)
    assert (head2, raw2) == (head, payload)


@pytest.mark.parametrize("value", [None, True, 1, -1, 2**64 - 1, -(2**63), 1.5, "s" * 40, b"b" * 300, [1, [2]],
                                   {"a": {"b": []}}, msgpack.ExtType(3, b"x" * 20), msgpack.Timestamp(1, 5),
                                   "x" * 70000, list(range(20)), {i: i for i in range(20)}])
def test_skip_steps_over_every_kind_of_value(value):
    data = msgpack.packb(value) + b"\x01"
    assert _wire.skip(data, 0) == len(data) - 1
    with pytest.raises(BadEnvelope):
        _wire.skip(data[:-2], 0)


def test_payload_bytes_are_kept_verbatim_even_when_not_canonical():
    # uint32 form of 1, a str8 of 3 bytes, a float32: re-encoding would change them.
    payload = b"\x93\xce\x00\x00\x00\x01\xd9\x03abc\xca\x3f\x80\x00\x00"
    body = msgpack.packb({"type": "request", "id": "Echo", "correlation_id": 1, "source": "c", "target": "e"})
    body = bytes([body[0] + 1]) + body[1:] + b"\xa7payload" + payload
    head, raw, value = decode_envelope(body)
    assert raw == payload and head["id"] == "Echo" and value == [1, "abc", 1.0]


@pytest.mark.parametrize("body, why", [
    (b"\xc1", "not MessagePack"),
    (msgpack.packb([1, 2, 3]), "not a map but an array"),
    (msgpack.packb("text"), "not a map but a str"),
    (msgpack.packb({"type": "event"}) + b"\x00", "bytes after the envelope"),
    (msgpack.packb({"type": "event", "payload": 1}) + b"\x01", "bytes after the envelope"),
    (b"\x82\xa4type\xa5event\xa7payload", "not MessagePack"),
])
def test_bad_bodies_are_refused_with_a_reason(body, why):
    with pytest.raises(BadEnvelope, match=why):
        decode_envelope(body)


def unframe(data):
    (n,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + n
    return msgpack.unpackb(data[4:], raw=False, strict_map_key=False)


@pytest.mark.parametrize("cid", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 + 1, U64_MAX])
def test_replies_carry_any_u64_correlation_id(cid):
    assert unframe(_wire.response("M", cid, "c.0", b"\x01")) == {
        "type": "response", "id": "M", "correlation_id": cid, "target": "c.0", "payload": 1}


def test_the_hand_made_encoders_write_valid_envelopes():
    assert unframe(_wire.response("Échø", 5, "client.0", None)) == {
        "type": "response", "id": "Échø", "correlation_id": 5, "target": "client.0"}
    assert unframe(_wire.response("M", 5, "c", b"\xc0", more=True)) == {
        "type": "response", "id": "M", "correlation_id": 5, "target": "c", "more": True, "payload": None}
    assert unframe(_wire.response("M", 5, "c", None, more=True))["more"] is True
    long = "m" * 40000
    assert unframe(_wire.error("M", 9, "c", "nope", long)) == {
        "type": "error", "id": "M", "correlation_id": 9, "target": "c", "code": "nope", "error": long}
    assert unframe(_wire.request("svc", "Do", 3, b"\x92\x01\x02", 1500, "k" * 256, True)) == {
        "type": "request", "id": "Do", "correlation_id": 3, "target": "svc", "timeout_ms": 1500,
        "key": "k" * 256, "stream": True, "payload": [1, 2]}
    assert unframe(_wire.request("svc", "Do", 3, None, None, None, False)) == {
        "type": "request", "id": "Do", "correlation_id": 3, "target": "svc"}
    assert unframe(_wire.event("broker", "cancel", None, U64_MAX)) == {
        "type": "event", "id": "cancel", "target": "broker", "correlation_id": U64_MAX}
    for n in (31, 32, 255, 256, 65535, 65536):
        assert unframe(_wire.event("t", "e", _wire.enc_str("s" * n)))["payload"] == "s" * n


def test_values_and_raw():
    value = {"bin": b"\x00\xff", "big": U64_MAX, "neg": -(2**63), "ext": msgpack.ExtType(5, b"ab"),
             "f": 1.5, "t": msgpack.Timestamp(1, 2), "nested": [{"k": None}]}
    assert _wire.decode_value(_wire.encode_value(value)) == value
    assert _wire.encode_value(Raw(b"\x93\x01\x02\x03")) == b"\x93\x01\x02\x03"
    assert Raw(None).data is None and Raw(b"").data is None
    assert Raw(bytearray(b"\x01")).decode() == 1
    with pytest.raises(TypeError):
        _wire.encode_value(object())
    # The packer is usable after a failure.
    assert _wire.encode_value([1]) == b"\x91\x01"
