// Unit tests of the framing, the envelope codec and the payload codec.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Raw, decode, encode } from '../index.js';
import { MsgpackError, skipValue } from '../lib/msgpack.js';
import {
  EVENT, EnvelopeError, Fields, FrameError, FrameReader, Outbox, REQUEST, RESPONSE, TooLargeError,
  decodeCanonical, decodeEnvelope, salvageRequest,
} from '../lib/wire.js';

const frameOf = (value) => {
  const body = Buffer.from(encode(value));
  const out = Buffer.alloc(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  body.copy(out, 4);
  return out;
};

test('frames are found across reads of any size', () => {
  const values = [{ a: 1 }, 'x'.repeat(70_000), [1, 2, 3], new Uint8Array(5)];
  const stream = Buffer.concat(values.map(frameOf));
  for (const size of [1, 2, 3, 4, 5, 7, 64, 4096, 65536, stream.length]) {
    const got = [];
    const reader = new FrameReader(1 << 20, (b, s, e) => got.push(decode(b.subarray(s, e))));
    for (let i = 0; i < stream.length; i += size) reader.push(stream.subarray(i, i + size));
    assert.deepEqual(got, values, `reads of ${size}`);
    assert.equal(reader.buffered, 0);
  }
  // A frame cut short is held, and says how much it lacks.
  const reader = new FrameReader(1 << 20, () => assert.fail('no whole frame'));
  reader.push(stream.subarray(0, 3));
  assert.deepEqual([reader.buffered, reader.expected], [3, 4]);
  reader.push(stream.subarray(3, 6));
  assert.equal(reader.buffered, 6);
  assert.equal(reader.expected, 4 + stream.readUInt32BE(0));
});

test('a length over the limit is refused before anything is buffered for it', () => {
  const reader = new FrameReader(1000, () => assert.fail('no frame'));
  const head = Buffer.alloc(4);
  head.writeUInt32BE(1001, 0);
  assert.throws(() => reader.push(head), FrameError);
  // Even when the length comes a byte at a time.
  const slow = new FrameReader(1000, () => assert.fail('no frame'));
  slow.push(head.subarray(0, 2));
  assert.throws(() => slow.push(head.subarray(2)), /frame length 1001 exceeds the limit of 1000 bytes/);
  // At the limit is fine.
  const ok = [];
  const exact = new FrameReader(1000, (b, s, e) => ok.push(e - s));
  const body = Buffer.alloc(1000, 0xc0);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(1000, 0);
  exact.push(Buffer.concat([h, body]));
  assert.deepEqual(ok, [1000]);
});

function decoded(value) {
  const body = Buffer.from(value instanceof Uint8Array ? value : encode(value));
  const f = new Fields();
  decodeEnvelope(body, 0, body.length, f);
  return [f, body];
}

test('envelopes decode by span, with keys in any order and unknown keys skipped', () => {
  const [f, b] = decoded({
    payload: { deep: [1, { x: 2 }] }, extra: [1, 2], source: 'client.0', more: false, id: 'Echo',
    type: 'request', stream: true, key: 'k', correlation_id: 2n ** 64n - 1n, timeout_ms: 1500, target: 'w.0',
  });
  assert.equal(f.type, REQUEST);
  assert.equal(b.subarray(f.idS, f.idE).toString(), 'Echo');
  assert.equal(b.subarray(f.srcS, f.srcE).toString(), 'client.0');
  assert.equal(b[f.srcH], 0xa8, 'the header of the source str');
  assert.equal(f.cid, 2n ** 64n - 1n);
  assert.deepEqual([...b.subarray(f.cidH, f.cidE)], [0xcf, 255, 255, 255, 255, 255, 255, 255, 255]);
  assert.deepEqual([f.timeoutMs, f.stream, f.more], [1500, true, false]);
  assert.deepEqual(decode(b.subarray(f.payS, f.payE)), { deep: [1, { x: 2 }] });
  assert.equal(decode(b.subarray(f.keyS, f.keyE)), 'k');
  // Safe ids are numbers; nil counts as absent; an event needs no id.
  const [g] = decoded({ type: 'event', id: 'note', target: 'x', source: null, correlation_id: null, payload: null });
  assert.deepEqual([g.type, g.cid, g.srcS, g.payE - g.payS], [EVENT, 0, -1, 1]);
  const [h] = decoded({ type: 'response', id: 'M', correlation_id: 2 ** 53 - 1 });
  assert.deepEqual([h.type, h.cid], [RESPONSE, 2 ** 53 - 1]);
});

test('invalid envelopes are named', () => {
  const cases = [
    [[1], /must be a map, found array/],
    [{ type: 'request', id: 'M' }, /missing required field "correlation_id" for a request/],
    [{ type: 'request', id: '', correlation_id: 1 }, /missing required field "id"/],
    [{ id: 'M', correlation_id: 1 }, /missing required field "type"/],
    [{ type: 'nope', id: 'M' }, /unknown type "nope"/],
    [{ type: 'error', id: 'M', correlation_id: 1, error: 'x' }, /"code"/],
    [{ type: 'error', id: 'M', correlation_id: 1, code: 'x' }, /"error"/],
    [{ type: 'request', id: 1, correlation_id: 1 }, /field "id" must be str, found int/],
    [{ type: 'request', id: 'M', correlation_id: -1 }, /negative int/],
    [{ type: 'request', id: 'M', correlation_id: 'one' }, /must be a non-negative int, found str/],
    [{ type: 'request', id: 'M', correlation_id: 1, more: 1 }, /"more" must be bool/],
    [{ type: 'request', id: 'M', correlation_id: 1, target: [] }, /"target" must be str, found array/],
  ];
  for (const [value, why] of cases) {
    assert.throws(() => decoded(value), why, JSON.stringify(value));
  }
  const body = Buffer.from(encode({ type: 'event', id: 'x' }));
  assert.throws(() => decoded(Buffer.concat([body, Buffer.from([0xc0])])), /1 trailing bytes/);
  assert.throws(() => decoded(body.subarray(0, body.length - 1)), MsgpackError);
  assert.throws(() => decoded(Buffer.from([0x81, 0x01, 0x02])), /map key at byte 1 is a int, not a str/);
  assert.throws(() => decoded(Buffer.from([0xdf, 0xff, 0xff, 0xff, 0xff])), /map of 4294967295 entries/);
  assert.throws(() => decoded(Buffer.alloc(0)), EnvelopeError);
});

test('a rejected request is salvaged for its correlation id, method and source', () => {
  const body = Buffer.from(encode({ type: 'request', id: 'M', correlation_id: 7, source: 'c.0', timeout_ms: 'soon' }));
  const s = salvageRequest(body, 0, body.length);
  assert.equal(s.cid, 7);
  assert.equal(body.subarray(s.id[1], s.id[2]).toString(), 'M');
  assert.equal(body.subarray(s.source[1], s.source[2]).toString(), 'c.0');
  // A bad id does not hide the correlation id after it.
  const late = Buffer.from(encode({ type: 'request', id: 5, correlation_id: 8 }));
  assert.equal(salvageRequest(late, 0, late.length).cid, 8);
  for (const value of [{ type: 'event', id: 'x', correlation_id: 1 }, { type: 'request', id: 'M' }, [1]]) {
    const b = Buffer.from(encode(value));
    assert.equal(salvageRequest(b, 0, b.length), null, JSON.stringify(value));
  }
});

test('the outbox writes replies that copy the request, and envelopes in key order', () => {
  const written = [];
  const out = new Outbox((chunks) => written.push(...chunks), 1 << 20);
  const [f, b] = decoded({ type: 'request', id: 'Méthode', correlation_id: 2n ** 63n, source: 'client.0', target: 'w.0' });
  out.reply(b, f.idH, f.idE, f.cidH, f.cidE, f.srcH, f.srcE, true, Uint8Array.of(0x93, 1, 2, 3), 0, 4);
  out.reply(b, f.idH, f.idE, f.cidH, f.cidE, f.srcH, f.srcE, false, undefined, 0, 0, 'nope', 'ünïcode message');
  out.envelope({ type: REQUEST, id: 'Get', cid: 2 ** 40, target: 'store', timeoutMs: 30_000, stream: true, key: 'k', payload: Uint8Array.of(0xc0) });
  assert.equal(written.length, 0, 'nothing before a flush');
  out.flush();
  const all = Buffer.concat(written);
  const bodies = [];
  for (let pos = 0; pos < all.length;) {
    const n = all.readUInt32BE(pos);
    bodies.push(all.subarray(pos + 4, pos + 4 + n));
    pos += 4 + n;
  }
  assert.deepEqual(decode(bodies[0]), {
    type: 'response', id: 'Méthode', correlation_id: 2n ** 63n, target: 'client.0', more: true, payload: [1, 2, 3],
  });
  assert.deepEqual(decode(bodies[1]), {
    type: 'error', id: 'Méthode', correlation_id: 2n ** 63n, target: 'client.0', error: 'ünïcode message', code: 'nope',
  });
  assert.deepEqual(Object.keys(decode(bodies[2])),
    ['type', 'id', 'correlation_id', 'target', 'timeout_ms', 'stream', 'key', 'payload']);
  assert.equal(decode(bodies[2]).correlation_id, 2 ** 40);
  // Over the limit: refused, nothing written.
  const small = new Outbox(() => assert.fail('nothing to write'), 64);
  assert.throws(() => small.envelope({ type: EVENT, id: 'x', target: 'y', payload: new Uint8Array(100) }), TooLargeError);
  small.flush();
});

test('large payloads and many frames cross block boundaries intact', () => {
  const written = [];
  const out = new Outbox((chunks) => written.push(...chunks.map((c) => Buffer.from(c))), 1 << 24);
  const big = new Uint8Array(200_000).fill(9);
  const payload = Buffer.from(encode(big));
  for (let i = 0; i < 3000; i++) {
    out.envelope({ type: EVENT, id: `e${i}`, target: 't', payload: i % 1000 === 0 ? payload : Uint8Array.of(i & 0x7f) });
    if (i % 700 === 0) out.flush();
  }
  out.flush();
  const all = Buffer.concat(written);
  let pos = 0;
  let i = 0;
  for (; pos < all.length; i++) {
    const n = all.readUInt32BE(pos);
    const e = decode(all.subarray(pos + 4, pos + 4 + n));
    assert.equal(e.id, `e${i}`);
    if (i % 1000 === 0) assert.equal(e.payload.length, 200_000);
    else assert.equal(e.payload, i & 0x7f);
    pos += 4 + n;
  }
  assert.equal(i, 3000);
});

test('payloads: integers beyond 2^53 as bigint both ways, bin as bytes, Raw verbatim', () => {
  assert.equal(decode(Uint8Array.of(0xcf, 0, 0x20, 0, 0, 0, 0, 0, 0)), 2n ** 53n);
  assert.equal(decode(Uint8Array.of(0xcf, 0, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)), 2 ** 53 - 1);
  assert.equal(decode(Uint8Array.of(0xcf, 0, 0, 0, 0, 0, 0, 0, 7)), 7, 'a small u64 is a number');
  assert.equal(decode(Uint8Array.of(0xd3, 0xff, 0xdf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)), -(2n ** 53n) - 1n);
  for (const v of [2n ** 64n - 1n, -(2n ** 63n), 2n ** 53n, 5n, -5n]) {
    const back = decode(encode(v));
    assert.equal(BigInt(back), v);
    assert.equal(typeof back, v >= 2n ** 53n || v <= -(2n ** 53n) ? 'bigint' : 'number');
  }
  assert.deepEqual([...encode(5n)], [5], 'a small bigint in its shortest form');
  assert.throws(() => encode(2n ** 64n), RangeError);
  assert.throws(() => encode(-(2n ** 63n) - 1n), RangeError);
  assert.deepEqual(decode(encode({ b: Uint8Array.of(1, 2) })).b, Uint8Array.of(1, 2));
  const nested = encode({ a: new Raw(Uint8Array.of(0xcd, 0, 1)), b: [new Raw(Uint8Array.of(0xc0))] });
  assert.deepEqual([...nested], [0x82, 0xa1, 0x61, 0xcd, 0, 1, 0xa1, 0x62, 0x91, 0xc0]);
  const ts = decode(encode(new Date(1_700_000_000_123)));
  assert.equal(ts.getTime(), 1_700_000_000_123);
  // Map keys: str and ints; bigint keys as their digits.
  assert.deepEqual(decode(Uint8Array.of(0x81, 0xcf, 0, 0x40, 0, 0, 0, 0, 0, 0, 0xc3)), { '18014398509481984': true });
});

test('Raw checks its bytes, and reads fields of a map undecoded', () => {
  assert.throws(() => new Raw(Uint8Array.of(0x92, 1)), MsgpackError);
  assert.throws(() => new Raw(Uint8Array.of(1, 2)), /1 bytes after the value/);
  assert.throws(() => new Raw('x'), TypeError);
  const raw = new Raw(encode({ target: 'echo', payload: new Raw(Uint8Array.of(0xcd, 0, 7)) }));
  assert.deepEqual([...raw.get('payload').bytes], [0xcd, 0, 7]);
  assert.equal(raw.get('target').decode(), 'echo');
  assert.equal(raw.get('nothing'), undefined);
  assert.throws(() => new Raw(encode([1])).get('x'), /not a map/);
});

test('skipValue steps over every type and refuses bad bytes', () => {
  const all = encode([null, true, false, 1, -1, 200, -200, 70000, -70000, 2 ** 40, -(2 ** 40), 1.5,
    'a', 'b'.repeat(40), 'c'.repeat(300), 'd'.repeat(70000), Uint8Array.of(1), new Uint8Array(300),
    new Uint8Array(70000), new Array(20).fill(0), new Array(70000).fill(1),
    Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, i])), new Date(0), new Date(1e15)]);
  const withExt = Buffer.concat([Buffer.from([0x93]), Buffer.from([0xd4, 1, 2]), Buffer.from([0xd8, 1, ...new Array(16).fill(0)]),
    Buffer.from([0xc8, 0, 3, 5, 1, 2, 3])]);
  for (const bytes of [all, withExt, Uint8Array.of(0xca, 0, 0, 0, 0)]) {
    assert.equal(skipValue(bytes, 0, bytes.length), bytes.length);
    for (const cut of [1, 2, bytes.length - 1]) {
      if (cut < bytes.length) assert.throws(() => skipValue(bytes, 0, cut), MsgpackError);
    }
  }
  assert.throws(() => skipValue(Uint8Array.of(0xc1), 0, 1), /invalid byte 0xc1/);
  assert.throws(() => skipValue(Uint8Array.of(0xdd, 0xff, 0xff, 0xff, 0xff, 1), 0, 6), /truncated/);
});

test('the fast path reads what the general decoder reads, and leaves it anything else', () => {
  const written = [];
  const out = new Outbox((chunks) => written.push(...chunks), 1 << 20);
  const envelopes = [
    { type: REQUEST, id: 'Echo', cid: 7, target: 'w.0', timeoutMs: 30_000, payload: Uint8Array.of(0xc4, 1, 9) },
    { type: REQUEST, id: 'Get', cid: 2 ** 53 + 2, target: 'store', timeoutMs: 70_000, stream: true, key: 'k-1' },
    { type: REQUEST, id: 'M', cid: 2 ** 64 - 1, target: 't' },
    { type: EVENT, id: 'cancel', cid: 12, target: 'broker' },
    { type: EVENT, id: 'note', target: 'x', payload: Uint8Array.of(0x90) },
    { type: 4, id: 'M', cid: 300, target: 'c.0', error: 'x'.repeat(300), code: 'nope' },
  ];
  for (const e of envelopes) out.envelope(e);
  out.flush();
  const all = Buffer.concat(written);
  for (let pos = 0; pos < all.length;) {
    const n = all.readUInt32BE(pos);
    const body = all.subarray(pos + 4, pos + 4 + n);
    pos += 4 + n;
    const fast = new Fields();
    assert.ok(decodeCanonical(body, 0, body.length, fast), `fast path for ${decode(body).id}`);
    // The same fields in reverse order, with an unknown key: the general decoder.
    const value = decode(body);
    const shuffled = Buffer.from(encode(Object.fromEntries([['zz', 1], ...Object.entries(value).reverse()])));
    const slow = new Fields();
    assert.equal(decodeCanonical(shuffled, 0, shuffled.length, new Fields()), false);
    decodeEnvelope(shuffled, 0, shuffled.length, slow);
    const text = (f, b, s, e) => (s < 0 ? null : b.subarray(s, e).toString('latin1'));
    for (const [name, [s, e]] of Object.entries({
      id: ['idS', 'idE'], source: ['srcS', 'srcE'], target: ['tgtS', 'tgtE'], error: ['errS', 'errE'],
      code: ['codeS', 'codeE'], payload: ['payS', 'payE'], key: ['keyS', 'keyE'],
    })) {
      assert.equal(text(fast, body, fast[s], fast[e]), text(slow, shuffled, slow[s], slow[e]), name);
    }
    for (const name of ['type', 'cid', 'timeoutMs', 'stream', 'more']) assert.equal(fast[name], slow[name], name);
  }
  // Valid but not canonical: nil values, a non-fixstr id, a key out of order.
  for (const value of [
    { type: 'request', id: 'M', correlation_id: 1, source: null, target: 't' },
    { type: 'request', id: 'M'.repeat(40), correlation_id: 1, target: 't' },
    { type: 'request', correlation_id: 1, id: 'M', target: 't' },
    { type: 'request', id: 'M', correlation_id: 1, target: 't', stream: false },
  ]) {
    const b = Buffer.from(encode(value));
    assert.equal(decodeCanonical(b, 0, b.length, new Fields()), false, JSON.stringify(value));
    const f = new Fields();
    decodeEnvelope(b, 0, b.length, f);
    assert.equal(f.type, REQUEST);
  }
  // Cut short, the fast path declines and the general decoder names the problem.
  const body = all.subarray(4, 4 + all.readUInt32BE(0));
  assert.throws(() => decodeEnvelope(body, 0, body.length - 2, new Fields()), MsgpackError);
});
