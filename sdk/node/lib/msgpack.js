// MessagePack for payloads: @msgpack/msgpack with integers beyond 2^53 as
// bigint (and bigint encoded as an integer), `Raw` values written verbatim,
// and a scanner that finds where one value ends without decoding it.

import { Decoder, Encoder, DecodeError } from '@msgpack/msgpack';

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const MIN_SAFE = BigInt(Number.MIN_SAFE_INTEGER);
const U64_MAX = (1n << 64n) - 1n;
const I64_MIN = -(1n << 63n);

/** Raised when bytes are not (exactly) one well-formed MessagePack value. */
export class MsgpackError extends Error {
  constructor(message) {
    super(message);
    this.name = 'MsgpackError';
  }
}

/**
 * Where the MessagePack value starting at `pos` ends (the index after it),
 * without decoding it or allocating. Iterative, so deep nesting cannot
 * exhaust the stack; a count that lies runs into the end of `end` and fails.
 */
export function skipValue(b, pos, end) {
  let left = 1;
  while (left > 0) {
    if (pos >= end) throw new MsgpackError(`truncated value at byte ${pos}`);
    const m = b[pos++];
    left--;
    if (m <= 0x7f || m >= 0xe0) continue; // fixint
    if (m <= 0x8f) {
      left += 2 * (m & 0x0f); // fixmap
      continue;
    }
    if (m <= 0x9f) {
      left += m & 0x0f; // fixarray
      continue;
    }
    if (m <= 0xbf) {
      pos += m & 0x1f; // fixstr
      if (pos > end) throw new MsgpackError(`truncated str at byte ${pos}`);
      continue;
    }
    switch (m) {
      case 0xc0: // nil
      case 0xc2: // false
      case 0xc3: // true
        break;
      case 0xc4: // bin 8
      case 0xd9: // str 8
        if (pos + 1 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        pos += 1 + b[pos];
        break;
      case 0xc5:
      case 0xda:
        if (pos + 2 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        pos += 2 + ((b[pos] << 8) | b[pos + 1]);
        break;
      case 0xc6:
      case 0xdb:
        if (pos + 4 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        pos += 4 + u32(b, pos);
        break;
      case 0xc7: // ext 8: length, type, data
        if (pos + 1 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        pos += 2 + b[pos];
        break;
      case 0xc8:
        if (pos + 2 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        pos += 3 + ((b[pos] << 8) | b[pos + 1]);
        break;
      case 0xc9:
        if (pos + 4 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        pos += 5 + u32(b, pos);
        break;
      case 0xca: pos += 4; break; // float 32
      case 0xcb: pos += 8; break; // float 64
      case 0xcc: case 0xd0: pos += 1; break;
      case 0xcd: case 0xd1: pos += 2; break;
      case 0xce: case 0xd2: pos += 4; break;
      case 0xcf: case 0xd3: pos += 8; break;
      case 0xd4: pos += 2; break; // fixext 1
      case 0xd5: pos += 3; break;
      case 0xd6: pos += 5; break;
      case 0xd7: pos += 9; break;
      case 0xd8: pos += 17; break;
      case 0xdc: // array 16
        if (pos + 2 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        left += (b[pos] << 8) | b[pos + 1];
        pos += 2;
        break;
      case 0xdd:
        if (pos + 4 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        left += u32(b, pos);
        pos += 4;
        break;
      case 0xde: // map 16
        if (pos + 2 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        left += 2 * ((b[pos] << 8) | b[pos + 1]);
        pos += 2;
        break;
      case 0xdf:
        if (pos + 4 > end) throw new MsgpackError(`truncated length at byte ${pos}`);
        left += 2 * u32(b, pos);
        pos += 4;
        break;
      default: // 0xc1: never used
        throw new MsgpackError(`invalid byte 0x${m.toString(16)} at ${pos - 1}`);
    }
    if (pos > end) throw new MsgpackError(`truncated value at byte ${end}`);
  }
  return pos;
}

/** Big-endian u32 at `pos` (as a non-negative number). */
export function u32(b, pos) {
  return b[pos] * 0x1000000 + ((b[pos + 1] << 16) | (b[pos + 2] << 8) | b[pos + 3]);
}

/** Throws unless `bytes` hold exactly one well-formed MessagePack value. */
export function checkOneValue(bytes) {
  const end = skipValue(bytes, 0, bytes.length);
  if (end !== bytes.length) {
    throw new MsgpackError(`${bytes.length - end} bytes after the value`);
  }
}

const TRUSTED = Symbol('trusted');

/**
 * Bytes that already are one encoded MessagePack value, sent as they are:
 * as a handler's result, a partial reply, a call's or an event's payload,
 * or nested anywhere inside one.
 */
export class Raw {
  /**
   * @param {Uint8Array} bytes exactly one MessagePack value (checked; not copied)
   */
  constructor(bytes, trusted, src, start, end) {
    if (trusted !== TRUSTED) {
      if (!(bytes instanceof Uint8Array)) {
        throw new TypeError('Raw takes a Uint8Array of MessagePack bytes');
      }
      checkOneValue(bytes);
    }
    this._bytes = bytes;
    // A slice of a frame, made a view only when asked for.
    this._src = src;
    this._s = start;
    this._e = end;
  }

  /** The encoded value. */
  get bytes() {
    let bytes = this._bytes;
    if (bytes === null) {
      bytes = this._src.subarray(this._s, this._e);
      this._bytes = bytes;
    }
    return bytes;
  }

  /** The value, decoded (integers beyond 2^53 as bigint). */
  decode() {
    return decodePayload(this.bytes, 0, this.bytes.length);
  }

  /**
   * The value under the str key `key` of this map, as a `Raw` slice of
   * these bytes (undefined when absent): fields read verbatim, undecoded.
   * Throws a MsgpackError when this is not a map.
   */
  get(key) {
    const b = this.bytes;
    const end = b.length;
    let pos = 0;
    const m = b[pos++];
    let n;
    if (m >= 0x80 && m <= 0x8f) n = m & 0x0f;
    else if (m === 0xde) {
      n = (b[pos] << 8) | b[pos + 1];
      pos += 2;
    } else if (m === 0xdf) {
      n = u32(b, pos);
      pos += 4;
    } else throw new MsgpackError(`not a map (marker 0x${(m ?? 0).toString(16)})`);
    const want = Buffer.from(key, 'utf8');
    for (let i = 0; i < n; i++) {
      const span = strSpan(b, pos, end);
      const valueAt = skipValue(b, pos, end);
      const valueEnd = skipValue(b, valueAt, end);
      if (span !== null && span[1] - span[0] === want.length && equalAt(b, span[0], want)) {
        return new Raw(b.subarray(valueAt, valueEnd), TRUSTED, undefined, 0, 0);
      }
      pos = valueEnd;
    }
    return undefined;
  }

  static [Symbol.hasInstance](value) {
    return value != null && value[RAW_BRAND] === true;
  }
}
const RAW_BRAND = Symbol.for('procbroker.Raw');
Raw.prototype[RAW_BRAND] = true;

/** A Raw of bytes this SDK already checked (slices of a checked frame). */
export function trustedRaw(bytes) {
  return new Raw(bytes, TRUSTED, undefined, 0, 0);
}

/** A Raw of b[start, end), bytes this SDK already checked. */
export function spanRaw(b, start, end) {
  return new Raw(null, TRUSTED, b, start, end);
}

/** The content span of the str at `pos`, or null if it is not a str. */
function strSpan(b, pos, end) {
  const m = b[pos];
  let s;
  let len;
  if (m >= 0xa0 && m <= 0xbf) {
    s = pos + 1;
    len = m & 0x1f;
  } else if (m === 0xd9) {
    s = pos + 2;
    len = b[pos + 1];
  } else if (m === 0xda) {
    s = pos + 3;
    len = (b[pos + 1] << 8) | b[pos + 2];
  } else if (m === 0xdb) {
    s = pos + 5;
    len = u32(b, pos + 1);
  } else return null;
  if (s + len > end) throw new MsgpackError(`truncated str at byte ${pos}`);
  return [s, s + len];
}

function equalAt(b, at, want) {
  for (let i = 0; i < want.length; i++) if (b[at + i] !== want[i]) return false;
  return true;
}

/** Map keys as JS object keys: str and numbers as usual, bigint as its digits. */
function mapKeyConverter(key) {
  if (typeof key === 'string' || typeof key === 'number') return key;
  if (typeof key === 'bigint' || typeof key === 'boolean' || key === null) return String(key);
  throw new DecodeError(`a map key of type ${typeof key} has no JavaScript form (read the payload as Raw)`);
}

/** A decoder whose 64-bit integers are numbers when safe, bigint beyond. */
class PayloadDecoder extends Decoder {
  readU64() {
    const value = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return value <= MAX_SAFE ? Number(value) : value;
  }

  readI64() {
    const value = this.view.getBigInt64(this.pos);
    this.pos += 8;
    return value >= MIN_SAFE && value <= MAX_SAFE ? Number(value) : value;
  }

  clone() {
    return new PayloadDecoder({ mapKeyConverter });
  }
}

/** An encoder that writes bigint as an integer and `Raw` verbatim. */
class PayloadEncoder extends Encoder {
  doEncode(object, depth) {
    if (typeof object === 'bigint') {
      this.encodeBig(object);
    } else if (object instanceof Raw) {
      this.writeU8a(object.bytes);
    } else {
      super.doEncode(object, depth);
    }
  }

  encodeBig(value) {
    if (value >= MIN_SAFE && value <= MAX_SAFE) {
      this.encodeNumber(Number(value));
    } else if (value > 0n) {
      if (value > U64_MAX) throw new RangeError(`${value} does not fit in 64 bits`);
      this.ensureBufferSizeToWrite(9);
      this.view.setUint8(this.pos, 0xcf);
      this.view.setBigUint64(this.pos + 1, value);
      this.pos += 9;
    } else {
      if (value < I64_MIN) throw new RangeError(`${value} does not fit in 64 bits`);
      this.ensureBufferSizeToWrite(9);
      this.view.setUint8(this.pos, 0xd3);
      this.view.setBigInt64(this.pos + 1, value);
      this.pos += 9;
    }
  }

  clone() {
    return new PayloadEncoder({ initialBufferSize: 4096 });
  }
}

const decoder = new PayloadDecoder({ mapKeyConverter });
const encoder = new PayloadEncoder({ initialBufferSize: 4096 });

/**
 * Decodes the one value in `b[start, end)`. A plain Uint8Array view, so
 * that bin values decode as Uint8Array whatever `b` is.
 */
export function decodePayload(b, start, end) {
  return decoder.decode(new Uint8Array(b.buffer, b.byteOffset + start, end - start));
}

/**
 * Encodes `value`; the bytes returned are valid only until the next call
 * (copy them before encoding anything else). A `Raw` is its own bytes.
 */
export function encodeShared(value) {
  if (value instanceof Raw) return value.bytes;
  return encoder.encodeSharedRef(value);
}

/** Encodes `value` into bytes of its own. */
export function encode(value) {
  if (value instanceof Raw) return value.bytes;
  return encoder.encode(value);
}

/** Decodes one value from `bytes` (integers beyond 2^53 as bigint). */
export function decode(bytes) {
  return decodePayload(bytes, 0, bytes.length);
}
