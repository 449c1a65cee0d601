"""Frames and envelopes: the bytes on the pipes.

A frame is a 4-byte big-endian length ``L`` (``1 <= L <= max_frame_bytes``)
and ``L`` bytes holding one MessagePack map with string keys: the envelope.

Replies, requests and events are written here by hand from pre-encoded
pieces (the keys never change; method names and process ids repeat and are
cached), and a request's header is decoded apart from its payload, so that
a payload can be carried byte for byte (``ctx.raw_payload``) and decoded
only for the handlers that want it decoded.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any, Dict, List, Optional, Tuple

import msgpack

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
U64_MAX = (1 << 64) - 1

_UNPACK_OPTS = dict(raw=False, strict_map_key=False, unicode_errors="surrogateescape")
_unpackb = msgpack.unpackb
_pack_len = struct.Struct(">I").pack
_unpack_len_from = struct.Struct(">I").unpack_from


class FrameError(Exception):
    """The input is not a stream of frames any more (a length over the
    limit, or EOF inside a frame): nothing after it can be trusted."""


class Raw:
    """MessagePack bytes sent verbatim: as a handler's result, or as the
    payload of ``call``, ``stream`` and ``emit``. ``Raw(None)`` (or
    ``Raw(b"")``) means no payload at all."""

    __slots__ = ("data",)

    def __init__(self, data: Optional[bytes]) -> None:
        if data is not None and type(data) is not bytes:
            data = bytes(data)
        self.data = data or None

    def decode(self) -> Any:
        """The decoded value (None when there is no payload)."""
        if self.data is None:
            return None
        return _unpackb(self.data, **_UNPACK_OPTS)

    def __bytes__(self) -> bytes:
        return self.data or b""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Raw) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"Raw({self.data!r})"


def decode_value(data: bytes) -> Any:
    """One MessagePack value (ints up to 2**64-1 stay ints, bin stays bytes,
    ext and timestamps come back as ``msgpack.ExtType``/``Timestamp``)."""
    return _unpackb(data, **_UNPACK_OPTS)


_tls = threading.local()


def _packer() -> msgpack.Packer:
    try:
        return _tls.packer
    except AttributeError:
        p = _tls.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        return p


def encode_value(value: Any) -> Optional[bytes]:
    """A value as payload bytes: ``Raw`` verbatim, anything else packed."""
    if type(value) is Raw:
        return value.data
    try:
        return _packer().pack(value)
    except BaseException:
        # A failed pack can leave the packer's buffer dirty: start afresh.
        _tls.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        raise


# --- encoding by hand --------------------------------------------------------

_str_cache: Dict[str, bytes] = {}


def enc_str(s: str) -> bytes:
    """``s`` as a MessagePack str, cached (method names and process ids
    repeat)."""
    b = _str_cache.get(s)
    if b is not None:
        return b
    raw = s.encode("utf-8", "surrogateescape")
    n = len(raw)
    if n < 32:
        b = bytes((0xA0 | n,)) + raw
    elif n < 0x100:
        b = b"\xd9" + bytes((n,)) + raw
    elif n < 0x10000:
        b = b"\xda" + n.to_bytes(2, "big") + raw
    else:
        b = b"\xdb" + n.to_bytes(4, "big") + raw
    if n <= 256:
        if len(_str_cache) >= 4096:
            _str_cache.clear()
        _str_cache[s] = b
    return b


def enc_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


_K_TYPE_RESPONSE = b"\xa4type\xa8response"
_K_TYPE_ERROR = b"\xa4type\xa5error"
_K_TYPE_REQUEST = b"\xa4type\xa7request"
_K_TYPE_EVENT = b"\xa4type\xa5event"
_K_ID = b"\xa2id"
_K_CID = b"\xaecorrelation_id"
_K_TARGET = b"\xa6target"
_K_PAYLOAD = b"\xa7payload"
_K_MORE = b"\xa4more\xc3"
_K_STREAM = b"\xa6stream\xc3"
_K_TIMEOUT = b"\xaatimeout_ms"
_K_KEY = b"\xa3key"
_K_CODE = b"\xa4code"
_K_ERROR = b"\xa5error"


def _frame(entries: int, parts: List[bytes]) -> bytes:
    parts[0] = bytes((0x80 | entries,))
    body = b"".join(parts)
    return _pack_len(len(body)) + body


_reply_heads: Dict[Tuple[str, str, bool, bool], bytes] = {}
_cid_tail = struct.Struct(">16sQ").pack
_K_CID_U64 = _K_CID + b"\xcf"


def response(method: str, cid: int, target: str, payload: Optional[bytes], more: bool = False) -> bytes:
    """A reply frame (``more``: a partial reply); ``payload`` None: none.

    Written as ``type``, ``id``, ``target``, [``more``], [``payload``],
    ``correlation_id`` (always as a u64): all but the last two are the same
    for every reply of a method to a caller, and are cached.
    """
    if payload is None or more:
        head = _reply_heads.get((method, target, more, payload is None))
        if head is None:
            head = _response_head(method, target, more, payload is None)
        if payload is None:
            return b"".join((_pack_len(len(head) + 24), head, _cid_tail(_K_CID_U64, cid)))
    else:  # the common case: a final reply with a payload
        head = _final_heads.get((method, target))
        if head is None:
            head = _final_heads[(method, target)] = _response_head(method, target, False, False)
    return b"".join((_pack_len(len(head) + len(payload) + 24), head, payload, _cid_tail(_K_CID_U64, cid)))


_final_heads: Dict[Tuple[str, str], bytes] = {}


def _response_head(method: str, target: str, more: bool, empty: bool) -> bytes:
    if len(_reply_heads) >= 4096 or len(_final_heads) >= 4096:
        _reply_heads.clear()
        _final_heads.clear()
    entries = 4 + more + (not empty)
    head = bytes((0x80 | entries,)) + _K_TYPE_RESPONSE + _K_ID + enc_str(method) + _K_TARGET + enc_str(target)
    if more:
        head += _K_MORE
    if not empty:
        head += _K_PAYLOAD
    _reply_heads[(method, target, more, empty)] = head
    return head


def error(method: str, cid: int, target: str, code: str, message: str) -> bytes:
    """An error reply frame."""
    parts = [b"", _K_TYPE_ERROR, _K_ID, enc_str(method), _K_CID, enc_uint(cid), _K_TARGET, enc_str(target),
             _K_CODE, enc_str(code), _K_ERROR, enc_str(message)]
    return _frame(6, parts)


def request(target: str, method: str, cid: int, payload: Optional[bytes], timeout_ms: Optional[int],
            key: Optional[str], stream: bool) -> bytes:
    """A request frame."""
    parts = [b"", _K_TYPE_REQUEST, _K_ID, enc_str(method), _K_CID, enc_uint(cid), _K_TARGET, enc_str(target)]
    n = 4
    if timeout_ms is not None:
        parts += (_K_TIMEOUT, enc_uint(timeout_ms))
        n += 1
    if key is not None:
        parts += (_K_KEY, enc_str(key))
        n += 1
    if stream:
        parts.append(_K_STREAM)
        n += 1
    if payload is not None:
        parts += (_K_PAYLOAD, payload)
        n += 1
    return _frame(n, parts)


def event(target: str, name: str, payload: Optional[bytes], cid: Optional[int] = None) -> bytes:
    """An event frame (``cid``: the correlation id a ``cancel`` names)."""
    parts = [b"", _K_TYPE_EVENT, _K_ID, enc_str(name), _K_TARGET, enc_str(target)]
    n = 3
    if cid is not None:
        parts += (_K_CID, enc_uint(cid))
        n += 1
    if payload is not None:
        parts += (_K_PAYLOAD, payload)
        n += 1
    return _frame(n, parts)


# --- decoding ----------------------------------------------------------------

class BadEnvelope(Exception):
    """A frame whose body is not an envelope (not MessagePack, not a map)."""


#: Stands for a payload that was not decoded (it is valid MessagePack that
#: Python cannot hold as such: a map keyed by arrays, say).
NOT_DECODED = object()

_NIL = b"\xc0"


def decode_envelope(body: bytes) -> Tuple[Dict[str, Any], Optional[bytes], Any]:
    """The envelope's keys except ``payload`` (decoded), the payload's bytes
    exactly as they were (None when there is none), and the payload decoded
    (``NOT_DECODED`` when Python cannot hold it).

    The fast way: the broker writes ``payload`` last, so the header is the
    body up to that key, decoded with a nil put in the payload's place.
    That decode succeeding with ``payload`` as its last key proves the key
    was found where the parser meets it (MessagePack is read front to
    back), so the rest of the body is the payload, which must then decode
    as exactly one value. Anything else takes the slow way, key by key.
    """
    p = body.find(_K_PAYLOAD)
    if p > 0:
        q = p + 8
        try:
            head = _unpackb(body[:q] + _NIL, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
            # popitem() takes the key parsed last (dicts keep their order).
            if type(head) is dict and head and head.popitem() == ("payload", None):
                raw = body[q:]
                return head, raw, _unpackb(raw, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
        except Exception:
            pass
    elif p < 0:
        try:
            head = _unpackb(body, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
            if type(head) is dict:
                return head, None, None
        except Exception:
            pass
    head, raw = _decode_slowly(body)
    if raw is None:
        return head, None, None
    try:
        return head, raw, _unpackb(raw, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    except Exception:
        return head, raw, NOT_DECODED


#: The envelope's keys: the slow way decodes these and ignores any other.
ENVELOPE_KEYS = frozenset(("type", "id", "correlation_id", "source", "target", "timeout_ms", "stream", "more",
                           "key", "error", "code"))


def _decode_slowly(body: bytes) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """Key by key, keeping the payload's span (any key order, any depth of
    nesting: values are stepped over without being built)."""
    if not body:
        raise BadEnvelope("an empty body")
    marker = body[0]
    if 0x80 <= marker <= 0x8F:
        entries, pos = marker & 0x0F, 1
    elif marker == 0xDE and len(body) >= 3:
        entries, pos = int.from_bytes(body[1:3], "big"), 3
    elif marker == 0xDF and len(body) >= 5:
        entries, pos = int.from_bytes(body[1:5], "big"), 5
    else:
        skip(body, 0)  # not MessagePack at all: says why
        raise BadEnvelope(f"not a map but {_marker_kind(marker)}")
    head: Dict[str, Any] = {}
    payload: Optional[bytes] = None
    for _ in range(entries):
        key_end = skip(body, pos)
        value_end = skip(body, key_end)
        try:
            key = _unpackb(body[pos:key_end], **_UNPACK_OPTS)
        except Exception:
            key = None
        if key == "payload":
            payload = body[key_end:value_end]
        elif key in ENVELOPE_KEYS:
            try:
                head[key] = _unpackb(body[key_end:value_end], **_UNPACK_OPTS)
            except Exception as e:
                raise BadEnvelope(f"{key}: {_why(e)}") from None
        pos = value_end
    if pos != len(body):
        raise BadEnvelope(f"{len(body) - pos} bytes after the envelope")
    return head, payload


def _marker_kind(marker: int) -> str:
    """What a value is, from its first byte."""
    if marker <= 0x7F or marker >= 0xE0 or 0xCC <= marker <= 0xD3:
        return "an int"
    if 0x90 <= marker <= 0x9F or marker in (0xDC, 0xDD):
        return "an array"
    if 0xA0 <= marker <= 0xBF or 0xD9 <= marker <= 0xDB:
        return "a str"
    if marker == 0xC0:
        return "nil"
    if marker in (0xC2, 0xC3):
        return "a bool"
    if 0xC4 <= marker <= 0xC6:
        return "bin"
    if marker in (0xCA, 0xCB):
        return "a float"
    return "an ext"


# Bytes after the marker that a value's length (or count) is read from, and
# whether it counts bytes (False: items of an array or map).
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2,
          0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}


def skip(data: bytes, pos: int) -> int:
    """Where the MessagePack value at ``pos`` ends. Iterative: any depth of
    nesting, with no recursion. Raises BadEnvelope when ``data`` ends first
    or holds the one byte MessagePack never uses (0xc1)."""
    end = len(data)
    left = 1  # values still to step over
    while left:
        if pos >= end:
            raise BadEnvelope("not MessagePack: it ends inside a value")
        m = data[pos]
        left -= 1
        if m <= 0x7F or m >= 0xE0:
            pos += 1
        elif m <= 0x8F:
            left += 2 * (m & 0x0F)
            pos += 1
        elif m <= 0x9F:
            left += m & 0x0F
            pos += 1
        elif m <= 0xBF:
            pos += 1 + (m & 0x1F)
        elif m in _FIXED:
            pos += 1 + _FIXED[m]
        elif m in _SIZED:
            w = _SIZED[m]
            pos += 1 + w + int.from_bytes(data[pos + 1:pos + 1 + w], "big")
        elif m in _EXT:
            w = _EXT[m]
            pos += 2 + w + int.from_bytes(data[pos + 1:pos + 1 + w], "big")
        elif m in (0xDC, 0xDD, 0xDE, 0xDF):
            w = 2 if m in (0xDC, 0xDE) else 4
            n = int.from_bytes(data[pos + 1:pos + 1 + w], "big")
            left += 2 * n if m >= 0xDE else n
            pos += 1 + w
        else:
            raise BadEnvelope(f"not MessagePack: byte 0x{m:02x} at {pos}")
    if pos > end:
        raise BadEnvelope("not MessagePack: it ends inside a value")
    return pos


def _why(e: Exception) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _kind(value: Any) -> str:
    if value is None:
        return "nil"
    return {bool: "a bool", int: "an int", float: "a float", str: "a str", bytes: "bin",
            list: "an array", dict: "a map"}.get(type(value), type(value).__name__)


# --- reading frames ----------------------------------------------------------

_READ_SIZE = 64 * 1024


class FrameReader:
    """Whole frames from a file descriptor: each read takes what the pipe
    has (up to 64 KiB) and returns every frame it completes."""

    def __init__(self, fd: int, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.fd = fd
        self.max = max_frame_bytes
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._len = 0  # bytes held at the front of _buf

    def read(self) -> Optional[List[bytes]]:
        """The frames of the next read (maybe none yet), or None at EOF.
        Raises FrameError when the input is out of sync."""
        buf, view = self._buf, self._view
        n = os.readv(self.fd, [view[self._len:]])
        if n == 0:
            if self._len:
                raise FrameError(f"stdin ended inside a frame ({self._len} bytes of it read)")
            return None
        end = self._len + n
        frames: List[bytes] = []
        pos = 0
        limit = self.max
        data = view[:end].tobytes()  # one copy; each frame is a slice of it
        while end - pos >= 4:
            (length,) = _unpack_len_from(data, pos)
            if length == 0 or length > limit:
                raise FrameError(f"frame length {length} is not within 1..{limit}")
            stop = pos + 4 + length
            if stop > end:
                if 4 + length > len(buf):
                    # Larger than the buffer: read the rest of it straight
                    # into a buffer of its own.
                    frames.append(self._read_big(data, pos, end, length))
                    return frames
                break
            frames.append(data[pos + 4:stop])
            pos = stop
        rest = end - pos
        if rest and pos:
            buf[:rest] = data[pos:end]
        self._len = rest
        return frames

    def _read_big(self, data: bytes, pos: int, end: int, length: int) -> bytes:
        body = bytearray(length)
        have = end - pos - 4
        body[:have] = data[pos + 4:end]
        bview = memoryview(body)
        while have < length:
            n = os.readv(self.fd, [bview[have:]])
            if n == 0:
                raise FrameError(f"stdin ended inside a frame ({have} of its {length} bytes read)")
            have += n
        self._len = 0
        return bytes(body)
