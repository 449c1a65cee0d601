// Bad input from the broker's side, and handlers that misbehave: the
// service answers what it can, logs the rest to stderr, writes nothing but
// frames on stdout, and goes on (or, when stdin is out of sync, exits).

import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { encode } from '../index.js';
import { CALLER, FIXTURE, ME, Peer, frame, rawField, sleep } from './helpers.mjs';

const peers = [];
async function start(argv) {
  const peer = await Peer.start(argv);
  peers.push(peer);
  return peer;
}
const fixture = () => start([process.execPath, FIXTURE]);
after(() => {
  for (const peer of peers) peer.kill();
});

/** Bytes left on stdout after the last whole frame: must be none. */
function onlyFrames(peer) {
  assert.equal(peer.buf.length, 0, `stray bytes on stdout: ${peer.buf.toString('latin1').slice(0, 200)}`);
}

test('a frame cut in the middle, then EOF: logged, exit', async () => {
  const s = await start();
  const whole = frame(Buffer.from(encode(s.request('Ping'))));
  s.write(whole.subarray(0, whole.length - 5));
  await sleep(50);
  const closed = performance.now();
  s.eof();
  const { code, at } = await s.exit(1000);
  assert.ok(at - closed < 1000);
  assert.notEqual(code, 0, 'a torn stream is not a clean end');
  assert.match(s.stderr, /stdin ended inside a frame/);
  assert.equal(await s.nextBody(100), null, 'the torn request is not answered');
  onlyFrames(s);
});

test('a length over the limit: logged, exit without allocating it', async () => {
  const s = await start();
  const head = Buffer.alloc(4);
  head.writeUInt32BE(0xfffffff0, 0);
  s.write(Buffer.concat([head, Buffer.from('hell')]));
  const { code } = await s.exit(2000);
  assert.notEqual(code, 0);
  assert.match(s.stderr, /out of sync: frame length 4294967280 exceeds the limit of 16777216 bytes/);
  onlyFrames(s);
});

test('a body that is not a map, an unknown type, an empty frame: logged, service goes on', async () => {
  const s = await start();
  s.write(frame(Buffer.from(encode([1, 2, 3]))));
  s.write(frame(Buffer.from(encode({ type: 'telegram', id: 'x', correlation_id: 9, source: CALLER }))));
  s.write(frame(Buffer.alloc(0)));
  s.write(frame(Buffer.from([0xc1])));
  s.write(frame(Buffer.from([0x81, 0xa4, 0x74, 0x79, 0x70, 0x65]))); // truncated map
  assert.deepEqual(await s.value('Ping'), {});
  assert.match(s.stderr, /envelope must be a map, found array/);
  assert.match(s.stderr, /unknown type "telegram"/);
  assert.match(s.stderr, /empty frame/);
  onlyFrames(s);
});

test('an invalid request whose correlation id is readable is answered bad_request', async () => {
  const s = await start();
  // `id` is an int, `timeout_ms` negative, a key twice: each answered with the correlation id.
  for (const [bad, why] of [
    [{ type: 'request', id: 7, correlation_id: 41, source: CALLER, target: ME }, /field "id" must be str/],
    [{ type: 'request', id: 'Ping', correlation_id: 42, source: CALLER, target: ME, timeout_ms: -5 }, /negative int/],
    [{ type: 'request', id: 'Ping', correlation_id: 43, source: CALLER, target: ME, stream: 'yes' }, /"stream" must be bool/],
  ]) {
    s.write(frame(Buffer.from(encode(bad))));
    const reply = await s.next();
    assert.deepEqual([reply.type, reply.code, reply.correlation_id, reply.target],
      ['error', 'bad_request', bad.correlation_id, CALLER]);
    assert.match(reply.error, why);
  }
  // A duplicate key, written by hand.
  const dup = Buffer.concat([Buffer.from([0x86]), Buffer.from(encode('type')), Buffer.from(encode('request')),
    Buffer.from(encode('id')), Buffer.from(encode('Ping')), Buffer.from(encode('id')), Buffer.from(encode('Ping')),
    Buffer.from(encode('correlation_id')), Buffer.from(encode(44)), Buffer.from(encode('source')),
    Buffer.from(encode(CALLER)), Buffer.from(encode('target')), Buffer.from(encode(ME))]);
  s.write(frame(dup));
  const reply = await s.next();
  assert.deepEqual([reply.code, reply.correlation_id], ['bad_request', 44]);
  assert.match(reply.error, /duplicate key "id"/);
  assert.deepEqual(await s.value('Ping'), {});
});

test('a reply for an unknown correlation id is dropped', async () => {
  const s = await start();
  s.send({ type: 'response', id: 'Echo', correlation_id: 777, source: 'echo.0', target: ME, payload: 1 });
  s.send({ type: 'error', id: 'Echo', correlation_id: 778, source: 'broker', target: ME, code: 'timeout', error: 'late' });
  s.send({ type: 'response', id: 'Echo', correlation_id: 779, source: 'echo.0', target: ME, more: true });
  assert.deepEqual(await s.value('Ping'), {});
  assert.ok(await s.quiet(100));
});

test('a shutdown from a non-broker source is ignored', async () => {
  const s = await start();
  for (const source of [CALLER, 'brokers', 'Broker', undefined]) {
    const event = { type: 'event', id: 'shutdown', target: ME };
    if (source !== undefined) event.source = source;
    s.send(event);
  }
  await sleep(100);
  assert.deepEqual(await s.value('Ping'), {});
  assert.equal(s.child.exitCode, null);
});

test('handlers that throw or reject reply an error, and the service goes on', async () => {
  const s = await fixture();
  for (const [method, code, message] of [
    ['Throw', 'handler', 'a plain exception'],
    ['Reject', 'handler', 'an async failure'],
    ['ThrowValue', 'handler', 'not an Error'],
    ['Coded', 'teapot', 'short and stout'],
    ['Unencodable', 'internal', /does not encode/],
  ]) {
    const reply = await s.call(s.request(method));
    assert.deepEqual([reply.type, reply.code], ['error', code], method);
    if (typeof message === 'string') assert.equal(reply.error, message);
    else assert.match(reply.error, message);
  }
  assert.deepEqual(await s.value('Ping'), {});
});

test('a handler that blocks past its deadline: answered late, the service goes on', async () => {
  const s = await fixture();
  const busy = s.request('Busy', { ms: 300 }, { timeout_ms: 100 });
  s.send(busy);
  // The broker's deadline passes while the handler blocks the loop: its
  // cancel is read after the reply went out (the broker drops that reply).
  await sleep(150);
  s.cancel(busy, 'timeout');
  const late = await s.next();
  assert.deepEqual([late.correlation_id, late.payload], [busy.correlation_id, { busy: 300 }]);
  assert.deepEqual(await s.value('Ping'), {});
  // An async handler past its deadline, cancelled while it waits: no reply.
  const slow = s.request('Stubborn', { ms: 300 }, { timeout_ms: 100 });
  s.send(slow);
  await sleep(150);
  s.cancel(slow, 'timeout');
  await sleep(250);
  assert.equal(await s.value('Finished'), 2, 'both handlers ran to their end');
  assert.ok(await s.quiet(100), 'the cancelled one got no reply');
});

test('a handler that ignores cancel: no reply for it, and EOF still ends the process', async () => {
  const s = await fixture();
  const stubborn = s.request('Stubborn', { ms: 200 });
  s.send(stubborn);
  await sleep(20);
  s.cancel(stubborn, 'cancelled');
  assert.deepEqual(await s.value('Ping'), {});
  await sleep(300);
  assert.equal(await s.value('Finished'), 1);
  assert.ok(await s.quiet(100), 'the cancelled request got no reply');
  s.send(s.request('Stubborn', { ms: 60_000 }));
  await sleep(20);
  const closed = performance.now();
  s.eof();
  const { code, at } = await s.exit(1000);
  assert.equal(code, 0);
  assert.ok(at - closed < 1000, `${at - closed} ms`);
});

test('10 000 calls in flight from one client, exactly one reply each', async () => {
  const s = await start();
  const n = 10_000;
  const parts = [];
  for (let i = 1; i <= n; i++) {
    parts.push(frame(Buffer.from(encode({ type: 'request', id: 'Sleep', correlation_id: i, source: CALLER,
      target: ME, payload: { ms: 300 } }))));
  }
  s.write(Buffer.concat(parts));
  await sleep(100);
  assert.equal((await s.value('Active')).sleeping, n, 'all in flight at once');
  const seen = new Uint8Array(n + 1);
  for (let i = 0; i < n; i++) {
    const reply = await s.next(10_000);
    assert.equal(reply.payload.cancelled, false);
    seen[reply.correlation_id]++;
  }
  assert.ok(seen.slice(1).every((c) => c === 1));
});

test('a payload of 8 MiB both ways', async () => {
  const s = await start();
  const big = Buffer.alloc(8 * 1024 * 1024);
  for (let i = 0; i < big.length; i += 4096) big[i] = i & 0xff;
  const reply = await s.call(s.request('Echo', big), 20_000);
  assert.ok(Buffer.from(reply.payload).equals(big));
  const f = await fixture();
  const made = await f.call(f.request('Big', { bytes: 8 * 1024 * 1024 }), 20_000);
  assert.equal(made.payload.length, 8 * 1024 * 1024);
  assert.ok(made.payload.every((b) => b === 7));
  // Over the frame limit: the reply is an error, not a broken stream.
  const tooBig = await f.call(f.request('Big', { bytes: 17 * 1024 * 1024 }), 20_000);
  assert.deepEqual([tooBig.type, tooBig.code], ['error', 'too_large']);
  assert.deepEqual(await f.value('Ping'), {});
});

test('nothing but frames on stdout: console output goes to stderr', async () => {
  const s = await fixture();
  assert.equal(await s.value('Print'), null);
  await sleep(50);
  assert.match(s.stderr, /console\.log from main/);
  assert.match(s.stderr, /console\.log from a handler/);
  assert.match(s.stderr, /process\.stdout\.write from a handler/);
  s.eof();
  await s.exit(2000);
  assert.equal(await s.nextBody(100), null);
  onlyFrames(s);
});

test('streams: a sync generator, and a flood that a cancel still stops', async () => {
  const s = await fixture();
  const letters = s.request('Letters', { word: 'abc' }, { stream: true });
  s.send(letters);
  const got = [];
  for (;;) {
    const f = await s.next();
    got.push([f.more ?? false, f.payload]);
    if (!f.more) break;
  }
  assert.deepEqual(got, [[true, 'a'], [true, 'b'], [true, 'c'], [false, 3]]);
  const flood = s.request('Flood', { n: 1e9 }, { stream: true });
  s.send(flood);
  for (let i = 0; i < 10; i++) assert.equal((await s.next()).payload, i);
  s.cancel(flood, 'busy');
  const ping = s.request('Ping');
  s.send(ping);
  for (;;) {
    const f = await s.next(5000, 'the Ping reply after the flood');
    if (f.correlation_id === ping.correlation_id) break;
    assert.equal(f.more, true);
  }
  await sleep(50);
  assert.match(s.stderr, /flood stopped at \d+ of 1000000000: busy/);
  assert.ok(await s.quiet(100));
});

test('the context of a request', async () => {
  const s = await fixture();
  const request = s.request('Context', [1], { key: 'k-1', timeout_ms: 1000, stream: true, correlation_id: 2n ** 60n });
  const reply = await s.call(request);
  const { raw, ...rest } = reply.payload;
  assert.deepEqual([...raw], [0x91, 0x01]);
  assert.deepEqual(rest, {
    source: CALLER, method: 'Context', correlation_id: 2n ** 60n, key: 'k-1', stream: true, has_deadline: true,
  });
  const bare = await s.value('Context');
  assert.deepEqual([bare.raw, bare.key, bare.stream, bare.has_deadline, typeof bare.correlation_id],
    [null, null, false, false, 'number']);
  assert.equal(rawField(reply.body, 'correlation_id').length, 9);
});
