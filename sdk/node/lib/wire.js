// Frames and envelopes: a 4-byte big-endian length, then one MessagePack
// map with string keys. Decoding records where each field sits in the
// frame (spans), so a reply can copy the request's `id`, `correlation_id`
// and `source` byte for byte and a payload is never decoded unless a
// handler asks for it. Encoding writes the keys in the broker's own order.

import { MsgpackError, skipValue, u32 } from './msgpack.js';

/** The protocol's default `max_frame_bytes` (16 MiB). */
export const DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024;

export const REQUEST = 1;
export const RESPONSE = 2;
export const EVENT = 3;
export const ERROR = 4;

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** A whole frame that is not a valid envelope (the stream is still in sync). */
export class EnvelopeError extends Error {
  constructor(message) {
    super(message);
    this.name = 'EnvelopeError';
  }
}

/** Where one decoded envelope's fields are in its frame; reused per frame. */
export class Fields {
  constructor() {
    this.reset();
  }

  reset() {
    this.type = 0;
    this.idH = -1; // header of the id str (for a verbatim copy)
    this.idS = -1;
    this.idE = -1;
    this.cid = undefined; // number, or bigint beyond 2^53
    this.cidH = -1; // the int as written (marker included)
    this.cidE = -1;
    this.srcH = -1;
    this.srcS = -1;
    this.srcE = -1;
    this.tgtS = -1;
    this.tgtE = -1;
    this.timeoutMs = undefined;
    this.stream = false;
    this.more = false;
    this.keyS = -1; // the key's value, whatever its type
    this.keyE = -1;
    this.errS = -1;
    this.errE = -1;
    this.codeS = -1;
    this.codeE = -1;
    this.payS = -1;
    this.payE = -1;
  }
}

const K_TYPE = 1;
const K_ID = 2;
const K_CID = 4;
const K_SOURCE = 8;
const K_TARGET = 16;
const K_PAYLOAD = 32;
const K_ERROR = 64;
const K_CODE = 128;
const K_TIMEOUT = 256;
const K_STREAM = 512;
const K_MORE = 1024;
const K_KEY = 2048;

const KEY_NAMES = {
  [K_TYPE]: 'type', [K_ID]: 'id', [K_CID]: 'correlation_id', [K_SOURCE]: 'source',
  [K_TARGET]: 'target', [K_PAYLOAD]: 'payload', [K_ERROR]: 'error', [K_CODE]: 'code',
  [K_TIMEOUT]: 'timeout_ms', [K_STREAM]: 'stream', [K_MORE]: 'more', [K_KEY]: 'key',
};

function is(b, s, text) {
  for (let i = 0; i < text.length; i++) if (b[s + i] !== text.charCodeAt(i)) return false;
  return true;
}

/** Which envelope key the str b[s, s+len) is (0 for one it does not know). */
function keyOf(b, s, len) {
  switch (len) {
    case 2: return b[s] === 0x69 && b[s + 1] === 0x64 ? K_ID : 0;
    case 3: return is(b, s, 'key') ? K_KEY : 0;
    case 4:
      if (is(b, s, 'type')) return K_TYPE;
      if (is(b, s, 'code')) return K_CODE;
      return is(b, s, 'more') ? K_MORE : 0;
    case 5: return is(b, s, 'error') ? K_ERROR : 0;
    case 6:
      if (is(b, s, 'source')) return K_SOURCE;
      if (is(b, s, 'target')) return K_TARGET;
      return is(b, s, 'stream') ? K_STREAM : 0;
    case 7: return is(b, s, 'payload') ? K_PAYLOAD : 0;
    case 10: return is(b, s, 'timeout_ms') ? K_TIMEOUT : 0;
    case 14: return is(b, s, 'correlation_id') ? K_CID : 0;
    default: return 0;
  }
}

function kindName(m) {
  if (m <= 0x7f || m >= 0xe0) return 'int';
  if (m <= 0x8f) return 'map';
  if (m <= 0x9f) return 'array';
  if (m <= 0xbf) return 'str';
  switch (m) {
    case 0xc0: return 'nil';
    case 0xc2: case 0xc3: return 'bool';
    case 0xc4: case 0xc5: case 0xc6: return 'bin';
    case 0xc7: case 0xc8: case 0xc9: case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: return 'ext';
    case 0xca: case 0xcb: return 'float';
    case 0xdc: case 0xdd: return 'array';
    case 0xde: case 0xdf: return 'map';
    case 0xd9: case 0xda: case 0xdb: return 'str';
    case 0xc1: return 'an invalid byte';
    default: return 'int';
  }
}

// The decoder's cursor: module state, as decoding is synchronous.
let p = 0;
let lim = 0;

function need(n) {
  if (p + n > lim) throw new MsgpackError(`truncated at byte ${lim}`);
}

/** Reads a str header at p; returns the content length (p at content), or -1 if not a str. */
function strHead(b) {
  need(1);
  const m = b[p];
  if (m >= 0xa0 && m <= 0xbf) {
    p += 1;
    return m & 0x1f;
  }
  if (m === 0xd9) {
    need(2);
    p += 2;
    return b[p - 1];
  }
  if (m === 0xda) {
    need(3);
    p += 3;
    return (b[p - 2] << 8) | b[p - 1];
  }
  if (m === 0xdb) {
    need(5);
    p += 5;
    return u32(b, p - 4);
  }
  return -1;
}

// The header and content start of the str `readStr` read last.
let sH = 0;
let sS = 0;

/** Reads a str field: returns its end (sH, sS set), or -1 for nil (absent). */
function readStr(b, field) {
  const h = p;
  const len = strHead(b);
  if (len < 0) {
    if (b[p] === 0xc0) {
      p += 1;
      return -1;
    }
    throw new EnvelopeError(`field "${KEY_NAMES[field]}" must be str, found ${kindName(b[p])}`);
  }
  need(len);
  sH = h;
  sS = p;
  p += len;
  return p;
}

/** Reads a non-negative int field (number, or bigint beyond 2^53); nil as absent. */
function readUint(b, field) {
  need(1);
  const m = b[p];
  if (m <= 0x7f) {
    p += 1;
    return m;
  }
  let v;
  switch (m) {
    case 0xcc: need(2); v = b[p + 1]; p += 2; return v;
    case 0xcd: need(3); v = (b[p + 1] << 8) | b[p + 2]; p += 3; return v;
    case 0xce: need(5); v = u32(b, p + 1); p += 5; return v;
    case 0xcf: {
      need(9);
      const hi = u32(b, p + 1);
      const lo = u32(b, p + 5);
      p += 9;
      if (hi < 0x200000) return hi * 0x100000000 + lo;
      return (BigInt(hi) << 32n) | BigInt(lo);
    }
    case 0xd0: need(2); v = (b[p + 1] << 24) >> 24; p += 2; break;
    case 0xd1: need(3); v = (((b[p + 1] << 8) | b[p + 2]) << 16) >> 16; p += 3; break;
    case 0xd2: need(5); v = (b[p + 1] << 24) | (b[p + 2] << 16) | (b[p + 3] << 8) | b[p + 4]; p += 5; break;
    case 0xd3: {
      need(9);
      const hi = (b[p + 1] << 24) | (b[p + 2] << 16) | (b[p + 3] << 8) | b[p + 4];
      const lo = u32(b, p + 5);
      p += 9;
      if (hi < 0) { v = -1; break; }
      if (hi < 0x200000) return hi * 0x100000000 + lo;
      return (BigInt(hi) << 32n) | BigInt(lo);
    }
    case 0xc0: p += 1; return undefined;
    default:
      if (m >= 0xe0) { v = -1; break; }
      throw new EnvelopeError(`field "${KEY_NAMES[field]}" must be a non-negative int, found ${kindName(m)}`);
  }
  if (v < 0) throw new EnvelopeError(`field "${KEY_NAMES[field]}" must be a non-negative int, found a negative int`);
  return v;
}

function readBool(b, field) {
  need(1);
  const m = b[p++];
  if (m === 0xc3) return true;
  if (m === 0xc2 || m === 0xc0) return false;
  throw new EnvelopeError(`field "${KEY_NAMES[field]}" must be bool, found ${kindName(m)}`);
}

function typeOf(b, s, len) {
  switch (len) {
    case 7: return is(b, s, 'request') ? REQUEST : 0;
    case 8: return is(b, s, 'response') ? RESPONSE : 0;
    case 5:
      if (is(b, s, 'event')) return EVENT;
      return is(b, s, 'error') ? ERROR : 0;
    default: return 0;
  }
}

// Keys as written (str header and name), for the fast path: compared
// four bytes at a time through a DataView of the frame's buffer.
function keyWords(name) {
  const bytes = [0xa0 | name.length, ...Buffer.from(name, 'latin1')];
  const words = [];
  let i = 0;
  for (; i + 4 <= bytes.length; i += 4) {
    words.push(((bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3]) >>> 0);
  }
  return { words, tail: bytes.slice(i), length: bytes.length };
}
const FK_CID = keyWords('correlation_id');
const FK_SOURCE = keyWords('source');
const FK_TARGET = keyWords('target');
const FK_TIMEOUT = keyWords('timeout_ms');
const FK_STREAM = keyWords('stream');
const FK_MORE = keyWords('more');
const FK_KEY = keyWords('key');
const FK_ERROR = keyWords('error');
const FK_CODE = keyWords('code');
const FK_PAYLOAD = keyWords('payload');

// The DataView of the buffer frames are read from (made once per buffer).
let viewOf = null;
let view = null;

/** A DataView of `b` (the last one made is kept). */
function viewFor(b) {
  if (viewOf !== b) {
    view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    viewOf = b;
  }
  return view;
}

function keyAt(b, p, k) {
  const words = k.words;
  let q = p;
  for (let i = 0; i < words.length; i++, q += 4) if (view.getUint32(q) !== words[i]) return false;
  const tail = k.tail;
  for (let i = 0; i < tail.length; i++) if (b[q + i] !== tail[i]) return false;
  return true;
}

/** The end of the fixstr at `p` (sH, sS set), or -1 if it is not one. */
function fixstrAt(b, p) {
  const m = b[p];
  if (m < 0xa0 || m > 0xbf) return -1;
  sH = p;
  sS = p + 1;
  return p + 1 + (m & 0x1f);
}

/**
 * The fast path: keys in the order this package and the broker write
 * them (type, id, correlation_id, source, target, timeout_ms, stream,
 * more, key, error, code, payload), short strs, no nil values. Anything
 * else returns false and the general decoder reads the frame from the
 * start, so errors are reported the one way.
 */
export function decodeCanonical(b, start, end, f) {
  viewFor(b);
  let p = start;
  const m0 = b[p];
  if (m0 < 0x82 || m0 > 0x8f) return false;
  const n = m0 & 0x0f;
  p++;
  // "type": "request" | "response" | "event" | "error"
  if (view.getUint32(p) !== 0xa4747970 || b[p + 4] !== 0x65) return false;
  p += 5;
  let type;
  const w = view.getUint32(p);
  if (w === 0xa7726571 && view.getUint32(p + 4) === 0x75657374) {
    type = REQUEST;
    p += 8;
  } else if (w === 0xa8726573 && view.getUint32(p + 4) === 0x706f6e73 && b[p + 8] === 0x65) {
    type = RESPONSE;
    p += 9;
  } else if (w === 0xa5657665 && b[p + 4] === 0x6e && b[p + 5] === 0x74) {
    type = EVENT;
    p += 6;
  } else if (w === 0xa5657272 && b[p + 4] === 0x6f && b[p + 5] === 0x72) {
    type = ERROR;
    p += 6;
  } else return false;
  let e;
  if ((view.getUint32(p) >>> 8) !== 0xa26964) return false;
  e = fixstrAt(b, p + 3);
  if (e <= sS) return false; // not a str, or empty
  f.reset();
  f.type = type;
  f.idH = sH;
  f.idS = sS;
  f.idE = e;
  p = e;
  let read = 2;
  if (read < n && keyAt(b, p, FK_CID)) {
    p += FK_CID.length;
    const m = b[p];
    if (m <= 0x7f) {
      f.cid = m;
      f.cidH = p;
      p += 1;
    } else if (m === 0xcc) {
      f.cid = b[p + 1];
      f.cidH = p;
      p += 2;
    } else if (m === 0xcd) {
      f.cid = (b[p + 1] << 8) | b[p + 2];
      f.cidH = p;
      p += 3;
    } else if (m === 0xce) {
      f.cid = u32(b, p + 1);
      f.cidH = p;
      p += 5;
    } else if (m === 0xcf) {
      const hi = u32(b, p + 1);
      const lo = u32(b, p + 5);
      f.cid = hi < 0x200000 ? hi * 0x100000000 + lo : (BigInt(hi) << 32n) | BigInt(lo);
      f.cidH = p;
      p += 9;
    } else return false;
    f.cidE = p;
    read++;
  } else if (type !== EVENT) return false;
  if (read < n && keyAt(b, p, FK_SOURCE)) {
    e = fixstrAt(b, p + FK_SOURCE.length);
    if (e < 0) return false;
    f.srcH = sH;
    f.srcS = sS;
    f.srcE = e;
    p = e;
    read++;
  }
  if (read < n && keyAt(b, p, FK_TARGET)) {
    e = fixstrAt(b, p + FK_TARGET.length);
    if (e < 0) return false;
    f.tgtS = sS;
    f.tgtE = e;
    p = e;
    read++;
  }
  if (read < n && keyAt(b, p, FK_TIMEOUT)) {
    p += FK_TIMEOUT.length;
    const m = b[p];
    if (m <= 0x7f) {
      f.timeoutMs = m;
      p += 1;
    } else if (m === 0xcc) {
      f.timeoutMs = b[p + 1];
      p += 2;
    } else if (m === 0xcd) {
      f.timeoutMs = (b[p + 1] << 8) | b[p + 2];
      p += 3;
    } else if (m === 0xce) {
      f.timeoutMs = u32(b, p + 1);
      p += 5;
    } else return false;
    read++;
  }
  if (read < n && keyAt(b, p, FK_STREAM)) {
    if (b[p + FK_STREAM.length] !== 0xc3) return false;
    f.stream = true;
    p += FK_STREAM.length + 1;
    read++;
  }
  if (read < n && keyAt(b, p, FK_MORE)) {
    if (b[p + FK_MORE.length] !== 0xc3) return false;
    f.more = true;
    p += FK_MORE.length + 1;
    read++;
  }
  if (read < n && keyAt(b, p, FK_KEY)) {
    p += FK_KEY.length;
    if (b[p] === 0xc0) return false;
    f.keyS = p;
    p = skipValue(b, p, end);
    f.keyE = p;
    read++;
  }
  if (read < n && keyAt(b, p, FK_ERROR)) {
    p += FK_ERROR.length;
    lim = end;
    const t = p;
    const len = strHeadAt(b, t);
    if (len < 0) return false;
    f.errS = sS;
    f.errE = sS + len;
    p = sS + len;
    read++;
  }
  if (read < n && keyAt(b, p, FK_CODE)) {
    e = fixstrAt(b, p + FK_CODE.length);
    if (e <= sS) return false;
    f.codeS = sS;
    f.codeE = e;
    p = e;
    read++;
  }
  if (read < n && keyAt(b, p, FK_PAYLOAD)) {
    p += FK_PAYLOAD.length;
    f.payS = p;
    p = skipValue(b, p, end);
    f.payE = p;
    read++;
  }
  if (read !== n || p !== end) return false;
  if (type === ERROR && (f.codeS < 0 || f.errS < 0)) return false;
  if (type === EVENT && f.cid === undefined) f.cid = 0;
  return true;
}

/** A str header at `t`: the content length (sS set), or -1 if not a str. */
function strHeadAt(b, t) {
  const m = b[t];
  if (m >= 0xa0 && m <= 0xbf) {
    sS = t + 1;
    return m & 0x1f;
  }
  if (m === 0xd9) {
    sS = t + 2;
    return b[t + 1];
  }
  if (m === 0xda) {
    sS = t + 3;
    return (b[t + 1] << 8) | b[t + 2];
  }
  return -1;
}

/**
 * Decodes the envelope in b[start, end) into `f`. Throws EnvelopeError (or
 * MsgpackError) for anything that is not a valid envelope: not a map, a
 * key that is not a str, a known key twice, a field of the wrong type, an
 * unknown or missing `type`, a missing required field, trailing bytes.
 */
export function decodeEnvelope(b, start, end, f) {
  try {
    if (decodeCanonical(b, start, end, f)) return;
  } catch {
    // the general decoder names what is wrong
  }
  decodeAny(b, start, end, f);
}

function decodeAny(b, start, end, f) {
  f.reset();
  p = start;
  lim = end;
  if (start === end) throw new EnvelopeError('empty frame');
  const m = b[p++];
  let n;
  if (m >= 0x80 && m <= 0x8f) n = m & 0x0f;
  else if (m === 0xde) {
    need(2);
    n = (b[p] << 8) | b[p + 1];
    p += 2;
  } else if (m === 0xdf) {
    need(4);
    n = u32(b, p);
    p += 4;
  } else throw new EnvelopeError(`envelope must be a map, found ${kindName(m)}`);
  if (n > (end - p) / 2) throw new MsgpackError(`map of ${n} entries in ${end - p} bytes`);
  let seen = 0;
  for (let i = 0; i < n; i++) {
    const keyAt = p;
    const klen = strHead(b);
    if (klen < 0) throw new EnvelopeError(`envelope map key at byte ${keyAt - start} is a ${kindName(b[p])}, not a str`);
    need(klen);
    const key = keyOf(b, p, klen);
    p += klen;
    if (key === 0) {
      p = skipValue(b, p, end);
      continue;
    }
    if (seen & key) throw new EnvelopeError(`duplicate key "${KEY_NAMES[key]}"`);
    seen |= key;
    switch (key) {
      case K_TYPE: {
        const e = readStr(b, key);
        if (e >= 0) {
          f.type = typeOf(b, sS, e - sS);
          if (f.type === 0) {
            const shown = Buffer.from(b.subarray(sS, Math.min(e, sS + 64))).toString('utf8');
            throw new EnvelopeError(`unknown type ${JSON.stringify(shown)} (expected request, response, event or error)`);
          }
        }
        break;
      }
      case K_ID: {
        const e = readStr(b, key);
        if (e >= 0) {
          f.idH = sH;
          f.idS = sS;
          f.idE = e;
        }
        break;
      }
      case K_SOURCE: {
        const e = readStr(b, key);
        if (e >= 0) {
          f.srcH = sH;
          f.srcS = sS;
          f.srcE = e;
        }
        break;
      }
      case K_TARGET: {
        const e = readStr(b, key);
        if (e >= 0) {
          f.tgtS = sS;
          f.tgtE = e;
        }
        break;
      }
      case K_ERROR: {
        const e = readStr(b, key);
        if (e >= 0) {
          f.errS = sS;
          f.errE = e;
        }
        break;
      }
      case K_CODE: {
        const e = readStr(b, key);
        if (e >= 0) {
          f.codeS = sS;
          f.codeE = e;
        }
        break;
      }
      case K_CID: {
        const h = p;
        f.cid = readUint(b, key);
        if (f.cid !== undefined) {
          f.cidH = h;
          f.cidE = p;
        }
        break;
      }
      case K_TIMEOUT: {
        const t = readUint(b, key);
        f.timeoutMs = typeof t === 'bigint' ? Number(t) : t;
        break;
      }
      case K_STREAM: f.stream = readBool(b, key); break;
      case K_MORE: f.more = readBool(b, key); break;
      case K_KEY: {
        if (b[p] === 0xc0) {
          p += 1;
        } else {
          f.keyS = p;
          p = skipValue(b, p, end);
          f.keyE = p;
        }
        break;
      }
      case K_PAYLOAD: {
        f.payS = p;
        p = skipValue(b, p, end);
        f.payE = p;
        break;
      }
    }
  }
  if (p !== end) throw new EnvelopeError(`${end - p} trailing bytes after the envelope`);
  const type = f.type;
  if (type === 0) throw new EnvelopeError('missing required field "type"');
  const kind = TYPE_NAMES[type];
  if (f.idS < 0 || f.idE === f.idS) throw new EnvelopeError(`missing required field "id" for a ${kind}`);
  if (type !== EVENT && f.cid === undefined) {
    throw new EnvelopeError(`missing required field "correlation_id" for a ${kind}`);
  }
  if (type === ERROR) {
    if (f.codeS < 0 || f.codeE === f.codeS) throw new EnvelopeError('missing required field "code" for a error');
    if (f.errS < 0) throw new EnvelopeError('missing required field "error" for a error');
  }
  if (type === EVENT && f.cid === undefined) f.cid = 0;
}

export const TYPE_NAMES = ['', 'request', 'response', 'event', 'error'];

/**
 * What can be read of a rejected frame: a request's correlation id (and
 * method and source, if readable), so it can be answered `bad_request`.
 * Lenient: a field of the wrong type is skipped; stops at the first value
 * it cannot step over. Null when it is not recognisably a request.
 */
export function salvageRequest(b, start, end) {
  try {
    p = start;
    lim = end;
    const m = b[p++];
    let n;
    if (m >= 0x80 && m <= 0x8f) n = m & 0x0f;
    else if (m === 0xde) {
      need(2);
      n = (b[p] << 8) | b[p + 1];
      p += 2;
    } else if (m === 0xdf) {
      need(4);
      n = u32(b, p);
      p += 4;
    } else return null;
    let isRequest = false;
    let cid;
    let idSpan = null;
    let srcSpan = null;
    for (let i = 0; i < n && p < end; i++) {
      const klen = strHead(b);
      let key = 0;
      if (klen < 0) p = skipValue(b, p, end);
      else {
        need(klen);
        key = keyOf(b, p, klen);
        p += klen;
      }
      const at = p;
      try {
        if (key === K_TYPE) {
          const e = readStr(b, key);
          isRequest = e >= 0 && typeOf(b, sS, e - sS) === REQUEST;
        } else if (key === K_CID) {
          const v = readUint(b, key);
          if (v !== undefined) cid = v;
        } else if (key === K_ID) {
          const e = readStr(b, key);
          idSpan = e >= 0 ? [sH, sS, e] : null;
        } else if (key === K_SOURCE) {
          const e = readStr(b, key);
          srcSpan = e >= 0 ? [sH, sS, e] : null;
        } else {
          p = skipValue(b, p, end);
        }
      } catch (e) {
        if (!(e instanceof EnvelopeError)) throw e;
        p = skipValue(b, at, end);
      }
    }
    if (!isRequest || cid === undefined) return null;
    return { cid, id: idSpan, source: srcSpan };
  } catch {
    return null;
  }
}

/** The text of b[s, e) (UTF-8). */
export function text(b, s, e) {
  if (e - s < 24) {
    let ascii = '';
    for (let i = s; i < e; i++) {
      const c = b[i];
      if (c >= 0x80) return Buffer.prototype.utf8Slice.call(b, s, e);
      ascii += String.fromCharCode(c);
    }
    return ascii;
  }
  return Buffer.prototype.utf8Slice.call(b, s, e);
}

/** A frame that would exceed `max_frame_bytes`. */
export class TooLargeError extends Error {
  constructor(len, max) {
    super(`the frame would be ${len} bytes, over the limit of ${max}`);
    this.name = 'TooLargeError';
  }
}

// Keys and constant values, as written.
const bytes = (s) => Buffer.from(s, 'latin1');
const KB_TYPE = bytes('\xa4type');
const KB_ID = bytes('\xa2id');
const KB_CID = bytes('\xaecorrelation_id');
const KB_TARGET = bytes('\xa6target');
const KB_TIMEOUT = bytes('\xaatimeout_ms');
const KB_STREAM_TRUE = bytes('\xa6stream\xc3');
const KB_MORE_TRUE = bytes('\xa4more\xc3');
const KB_KEY = bytes('\xa3key');
const KB_ERROR = bytes('\xa5error');
const KB_CODE = bytes('\xa4code');
const KB_PAYLOAD = bytes('\xa7payload');
const V_TYPE = [null, bytes('\xa7request'), bytes('\xa8response'), bytes('\xa5event'), bytes('\xa5error')];
// `{"type": "response", "id": ` and `{"type": "error", "id": ` after the map header.
const RESPONSE_HEAD = Buffer.concat([KB_TYPE, V_TYPE[RESPONSE], KB_ID]);
const ERROR_HEAD = Buffer.concat([KB_TYPE, V_TYPE[ERROR], KB_ID]);

/** Constant bytes as big-endian words and a tail, to write four at a time. */
function constant(bytes) {
  const words = [];
  let i = 0;
  for (; i + 4 <= bytes.length; i += 4) {
    words.push(((bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3]) >>> 0);
  }
  return { words, tail: Array.from(bytes.subarray(i)), length: bytes.length };
}
// `"type": "response"` / `"type": "error"`, before the id's key.
const C_RESPONSE = constant(Buffer.concat([KB_TYPE, V_TYPE[RESPONSE]]));
const C_ERROR = constant(Buffer.concat([KB_TYPE, V_TYPE[ERROR]]));
const C_ID = constant(KB_ID);
const C_CID = constant(KB_CID);
const C_TARGET = constant(KB_TARGET);
const C_MORE_TRUE = constant(KB_MORE_TRUE);
const C_PAYLOAD = constant(KB_PAYLOAD);

/** Encoded length of str `s` (header included). */
export function strLen(s) {
  const n = Buffer.byteLength(s, 'utf8');
  return n + (n < 32 ? 1 : n < 0x100 ? 2 : n < 0x10000 ? 3 : 5);
}

function uintLen(v) {
  if (typeof v === 'bigint') return v <= MAX_SAFE ? uintLen(Number(v)) : 9;
  return v < 0x80 ? 1 : v < 0x100 ? 2 : v < 0x10000 ? 3 : v < 0x100000000 ? 5 : 9;
}

/** Large payloads are written as chunks of their own instead of copied. */
const SEPARATE = 64 * 1024;
const BLOCK = 64 * 1024;

/**
 * Frames on their way out. Frames are appended to a block; `flush()` hands
 * what was appended since the last flush to the sink in one write. Bytes
 * handed over are never written again (a new block is started when one is
 * full), so an asynchronous sink may hold on to them.
 */
export class Outbox {
  /**
   * @param {(chunks: Uint8Array[]) => void} sink takes the bytes in order
   * @param {number} maxFrameBytes
   */
  constructor(sink, maxFrameBytes) {
    this.sink = sink;
    this.max = maxFrameBytes;
    this.buf = Buffer.allocUnsafe(BLOCK);
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.pos = 0;
    this.start = 0;
    this.chunks = [];
    this.frames = 0;
  }

  /** Makes room for `n` more bytes of one frame in the block. */
  room(n) {
    if (this.pos + n <= this.buf.length) return;
    if (this.pos > this.start) this.chunks.push(this.buf.subarray(this.start, this.pos));
    this.newBlock(Math.max(BLOCK, n));
  }

  newBlock(size) {
    this.buf = Buffer.allocUnsafe(size);
    this.dv = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    this.pos = 0;
    this.start = 0;
  }

  /** Appends src[s, e), four bytes at a time. */
  bytes(src, s, e) {
    const n = e - s;
    if (n > 256) {
      this.buf.set(new Uint8Array(src.buffer, src.byteOffset + s, n), this.pos);
      this.pos += n;
      return;
    }
    const dv = this.dv;
    const sv = viewFor(src);
    let at = this.pos;
    let i = s;
    for (; i + 4 <= e; i += 4, at += 4) dv.setUint32(at, sv.getUint32(i));
    const b = this.buf;
    for (; i < e; i++) b[at++] = src[i];
    this.pos = at;
  }

  /** Appends a constant made by `constant()`. */
  put(c) {
    const dv = this.dv;
    const words = c.words;
    let at = this.pos;
    for (let i = 0; i < words.length; i++, at += 4) dv.setUint32(at, words[i]);
    const tail = c.tail;
    const b = this.buf;
    for (let i = 0; i < tail.length; i++) b[at++] = tail[i];
    this.pos = at;
  }

  /** Appends a payload pb[ps, pe) (after its key): copied, or a chunk of its own if large. */
  payload(pb, ps, pe) {
    const n = pe - ps;
    if (n >= SEPARATE) {
      if (this.pos > this.start) this.chunks.push(this.buf.subarray(this.start, this.pos));
      this.start = this.pos;
      this.chunks.push(ps === 0 && pe === pb.length ? pb : pb.subarray(ps, pe));
    } else {
      this.bytes(pb, ps, pe);
    }
  }

  /** The body length `len` checked against the limit. */
  check(len) {
    if (len > this.max) throw new TooLargeError(len, this.max);
  }

  u8(v) {
    this.buf[this.pos++] = v;
  }

  raw(k) {
    const n = k.length;
    const b = this.buf;
    const at = this.pos;
    for (let i = 0; i < n; i++) b[at + i] = k[i];
    this.pos = at + n;
  }

  mapHead(n) {
    this.buf[this.pos++] = 0x80 | n;
  }

  len32(v) {
    const b = this.buf;
    const at = this.pos;
    b[at] = v >>> 24;
    b[at + 1] = (v >>> 16) & 0xff;
    b[at + 2] = (v >>> 8) & 0xff;
    b[at + 3] = v & 0xff;
    this.pos += 4;
  }

  str(s) {
    const b = this.buf;
    const n = s.length;
    if (n < 32) {
      let ascii = true;
      for (let i = 0; i < n; i++) {
        if (s.charCodeAt(i) >= 0x80) {
          ascii = false;
          break;
        }
      }
      if (ascii) {
        b[this.pos++] = 0xa0 | n;
        for (let i = 0; i < n; i++) b[this.pos++] = s.charCodeAt(i);
        return;
      }
    }
    const len = Buffer.byteLength(s, 'utf8');
    if (len < 32) b[this.pos++] = 0xa0 | len;
    else if (len < 0x100) {
      b[this.pos++] = 0xd9;
      b[this.pos++] = len;
    } else if (len < 0x10000) {
      b[this.pos++] = 0xda;
      b[this.pos++] = len >>> 8;
      b[this.pos++] = len & 0xff;
    } else {
      b[this.pos++] = 0xdb;
      this.len32(len);
    }
    this.pos += b.utf8Write(s, this.pos, len);
  }

  uint(v) {
    const b = this.buf;
    if (typeof v === 'bigint') {
      if (v <= MAX_SAFE) {
        this.uint(Number(v));
        return;
      }
      b[this.pos] = 0xcf;
      b.writeBigUInt64BE(v, this.pos + 1);
      this.pos += 9;
      return;
    }
    if (v < 0x80) b[this.pos++] = v;
    else if (v < 0x100) {
      b[this.pos++] = 0xcc;
      b[this.pos++] = v;
    } else if (v < 0x10000) {
      b[this.pos++] = 0xcd;
      b[this.pos++] = v >>> 8;
      b[this.pos++] = v & 0xff;
    } else if (v < 0x100000000) {
      b[this.pos++] = 0xce;
      this.len32(v);
    } else {
      b[this.pos++] = 0xcf;
      this.len32(Math.floor(v / 0x100000000));
      this.len32(v >>> 0);
    }
  }

  /**
   * A reply to the request whose frame is `rb` (fields at the given spans):
   * `response` (with `more` for a partial) or, when `code` is a string,
   * `error`. The payload is pb[ps, pe), none when `pb` is undefined.
   */
  reply(rb, idH, idE, cidH, cidE, srcH, srcE, more, pb, ps, pe, code, message) {
    const isError = typeof code === 'string';
    const headLen = isError ? ERROR_HEAD.length : RESPONSE_HEAD.length; // type and the id's key
    let entries = 3;
    let len = 1 + headLen + (idE - idH) + KB_CID.length + (cidE - cidH);
    if (srcH >= 0) {
      entries++;
      len += KB_TARGET.length + (srcE - srcH);
    }
    if (more) {
      entries++;
      len += KB_MORE_TRUE.length;
    }
    if (isError) {
      entries += 2;
      len += KB_ERROR.length + strLen(message) + KB_CODE.length + strLen(code);
    }
    const plen = pb === undefined ? 0 : pe - ps;
    if (pb !== undefined) {
      entries++;
      len += KB_PAYLOAD.length + plen;
    }
    this.check(len);
    this.room(4 + len - (plen >= SEPARATE ? plen : 0));
    this.len32(len);
    this.mapHead(entries);
    this.put(isError ? C_ERROR : C_RESPONSE);
    if (cidH === idE + 15 && idH >= 3 && rb[idH - 3] === 0xa2 && rb[idH - 2] === 0x69 && rb[idH - 1] === 0x64) {
      // As the broker writes them: `"id": …, "correlation_id": …` in one piece.
      this.bytes(rb, idH - 3, cidE);
    } else {
      this.put(C_ID);
      this.bytes(rb, idH, idE);
      this.put(C_CID);
      this.bytes(rb, cidH, cidE);
    }
    if (srcH >= 0) {
      this.put(C_TARGET);
      this.bytes(rb, srcH, srcE);
    }
    if (more) this.put(C_MORE_TRUE);
    if (isError) {
      this.raw(KB_ERROR);
      this.str(message);
      this.raw(KB_CODE);
      this.str(code);
    }
    if (pb !== undefined) {
      this.put(C_PAYLOAD);
      this.payload(pb, ps, pe);
    }
    this.frames++;
  }

  /**
   * A frame built from fields: a request (`cid` set), an event, or an
   * error reply to a request that could not be decoded.
   */
  envelope({ type, id, cid, target, timeoutMs, stream, key, error, code, payload }) {
    let entries = 2;
    let len = KB_TYPE.length + V_TYPE[type].length + KB_ID.length + strLen(id);
    if (cid !== undefined) {
      entries++;
      len += KB_CID.length + uintLen(cid);
    }
    if (target !== undefined) {
      entries++;
      len += KB_TARGET.length + strLen(target);
    }
    if (timeoutMs !== undefined) {
      entries++;
      len += KB_TIMEOUT.length + uintLen(timeoutMs);
    }
    if (stream) {
      entries++;
      len += KB_STREAM_TRUE.length;
    }
    if (key !== undefined) {
      entries++;
      len += KB_KEY.length + strLen(key);
    }
    if (error !== undefined) {
      entries++;
      len += KB_ERROR.length + strLen(error);
    }
    if (code !== undefined) {
      entries++;
      len += KB_CODE.length + strLen(code);
    }
    if (payload !== undefined) {
      entries++;
      len += KB_PAYLOAD.length + payload.length;
    }
    len += 1;
    this.check(len);
    this.room(4 + len - (payload !== undefined && payload.length >= SEPARATE ? payload.length : 0));
    this.len32(len);
    this.mapHead(entries);
    this.raw(KB_TYPE);
    this.raw(V_TYPE[type]);
    this.raw(KB_ID);
    this.str(id);
    if (cid !== undefined) {
      this.raw(KB_CID);
      this.uint(cid);
    }
    if (target !== undefined) {
      this.raw(KB_TARGET);
      this.str(target);
    }
    if (timeoutMs !== undefined) {
      this.raw(KB_TIMEOUT);
      this.uint(timeoutMs);
    }
    if (stream) this.raw(KB_STREAM_TRUE);
    if (key !== undefined) {
      this.raw(KB_KEY);
      this.str(key);
    }
    if (error !== undefined) {
      this.raw(KB_ERROR);
      this.str(error);
    }
    if (code !== undefined) {
      this.raw(KB_CODE);
      this.str(code);
    }
    if (payload !== undefined) {
      this.raw(KB_PAYLOAD);
      this.payload(payload, 0, payload.length);
    }
    this.frames++;
  }

  /** Whether anything waits to be handed to the sink. */
  get pending() {
    return this.pos > this.start || this.chunks.length > 0;
  }

  /** Hands everything appended so far to the sink. */
  flush() {
    if (this.pos > this.start) {
      this.chunks.push(this.buf.subarray(this.start, this.pos));
      this.start = this.pos;
    }
    if (this.chunks.length === 0) return;
    const chunks = this.chunks;
    this.chunks = [];
    this.frames = 0;
    if (this.buf.length - this.pos < 512) this.newBlock(BLOCK);
    this.sink(chunks);
  }
}

/**
 * Splits a byte stream into frame bodies, across reads of any size: each
 * body goes to `onFrame(buf, start, end)` (a view into a buffer that is
 * never reused). A length over `max` throws a FrameError before anything
 * is allocated for it.
 */
export class FrameReader {
  constructor(maxFrameBytes, onFrame) {
    this.max = maxFrameBytes;
    this.onFrame = onFrame;
    this.parts = [];
    this.have = 0;
    this.need = 0; // bytes the frame being gathered takes, prefix included (0: unknown yet)
  }

  /** Bytes of an unfinished frame held (0 at a frame boundary). */
  get buffered() {
    return this.have;
  }

  /** The bytes the unfinished frame needs in all (prefix included; 4 if its prefix is cut). */
  get expected() {
    return this.need || 4;
  }

  push(chunk) {
    let b = chunk;
    if (this.have > 0) {
      this.parts.push(chunk);
      this.have += chunk.length;
      if (this.need === 0 && this.have >= 4) {
        const head = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts, this.have);
        this.need = 4 + this.lengthAt(head, 0);
        if (this.parts.length > 1) this.parts = [head];
      }
      if (this.need === 0 || this.have < this.need) return;
      b = Buffer.concat(this.parts, this.have);
      this.parts = [];
      this.have = 0;
      this.need = 0;
    }
    const n = b.length;
    let pos = 0;
    while (pos + 4 <= n) {
      const len = this.lengthAt(b, pos);
      if (pos + 4 + len > n) {
        this.need = 4 + len;
        break;
      }
      this.onFrame(b, pos + 4, pos + 4 + len);
      pos += 4 + len;
    }
    if (pos < n) {
      this.parts.push(pos === 0 ? b : b.subarray(pos));
      this.have = n - pos;
    }
  }

  lengthAt(b, pos) {
    const len = u32(b, pos);
    if (len > this.max) throw new FrameError(`frame length ${len} exceeds the limit of ${this.max} bytes`);
    return len;
  }
}

/** The input is no longer a stream of frames (over-long length, torn frame). */
export class FrameError extends Error {
  constructor(message) {
    super(message);
    this.name = 'FrameError';
  }
}
