// The conformance subject over its real pipes, the test playing the
// broker: what the conformance kit checks directly, and the request
// lifecycle (deadlines, cancel, streams, calls out) frame by frame.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { Raw, encode } from '../index.js';
import { CALLER, ME, Peer, big, frame, rawField } from './helpers.mjs';

const peers = [];
async function start(...args) {
  const peer = await Peer.start(...args);
  peers.push(peer);
  return peer;
}
after(() => {
  for (const peer of peers) peer.kill();
});

test('Ping, Echo verbatim, Fail with its code, WhoAmI, unknown methods', async () => {
  const s = await start();
  assert.deepEqual(await s.value('Ping'), {});
  // Echo: the payload's bytes verbatim (a non-shortest int, and odd types), none for none.
  for (const bytes of [
    [0xcd, 0x00, 0x07], // u16 7
    [0xd3, 0, 0, 0, 0, 0, 0, 0, 1], // i64 1
    [0xd6, 0xff, 0x5e, 0x5b, 0x0b, 0x80], // timestamp 32
    [0xc7, 0x03, 0x05, 1, 2, 3], // ext 8 of type 5
    [0x82, 0x01, 0xc4, 0x00, 0x92, 0xc0, 0xc3, 0xa1, 0x78], // {1: bin, [nil, true]: "x"}
    [0xca, 0x3f, 0x80, 0x00, 0x00], // f32 1.0
    [0xd9, 0x01, 0x41], // str 8 "A"
  ]) {
    const request = s.request('Echo');
    const body = Buffer.from(encode({ ...request, payload: new Raw(Uint8Array.from(bytes)) }));
    s.write(frame(body));
    const reply = await s.next();
    assert.equal(reply.correlation_id, request.correlation_id);
    assert.deepEqual([...(rawField(reply.body, 'payload'))], bytes);
  }
  const bare = await s.call(s.request('Echo'));
  assert.equal('payload' in bare, false, 'no payload echoed as none');

  const fail = await s.call(s.request('Fail', { code: 'nope', message: 'no way' }));
  assert.deepEqual([fail.type, fail.code, fail.error], ['error', 'nope', 'no way']);
  const plain = await s.call(s.request('Fail', { message: 'plain' }));
  assert.equal(plain.code, 'handler');
  assert.deepEqual(await s.value('WhoAmI'), { id: ME, pid: s.child.pid });
  const unknown = await s.call(s.request('Nope'));
  assert.deepEqual([unknown.type, unknown.code], ['error', 'unknown_method']);
  const badParams = await s.call(s.request('Sleep', 'not a map'));
  assert.equal(badParams.code, 'bad_request');
});

test('u64 correlation ids come back as they were written', async () => {
  const s = await start();
  for (const cid of [2n ** 53n + 1n, 2n ** 64n - 1n, 0n]) {
    const reply = await s.call({ ...s.request('Ping'), correlation_id: cid });
    assert.equal(BigInt(reply.correlation_id), cid);
  }
  // A non-shortest form is copied verbatim too.
  const body = Buffer.from(encode({ type: 'request', id: 'Ping', correlation_id: 0xabcdef, source: CALLER, target: ME }));
  const at = body.indexOf(Buffer.from([0xce, 0x00, 0xab, 0xcd, 0xef]));
  assert.ok(at > 0);
  const widened = Buffer.concat([body.subarray(0, at), Buffer.from([0xcf, 0, 0, 0, 0, 0, 0xab, 0xcd, 0xef]), body.subarray(at + 5)]);
  s.write(frame(widened));
  const reply = await s.next();
  assert.ok(reply.body.includes(Buffer.from([0xcf, 0, 0, 0, 0, 0, 0xab, 0xcd, 0xef])), 'cid written as it came');
});

test('the handler sees its deadline', async () => {
  const s = await start();
  const left = await s.value('Deadline', undefined, { timeout_ms: 5000 });
  assert.ok(Number.isInteger(left) && left >= 4000 && left <= 5000, `${left} ms left of 5000`);
  assert.equal(await s.value('Deadline'), null, 'none sent, none seen');
});

test('a cancel from the broker stops the handler and its reply', async () => {
  const s = await start();
  const sleep10 = s.request('Sleep', { ms: 10_000 }, { timeout_ms: 300 });
  s.send(sleep10);
  await s.activeReaches(1, 5000);
  assert.equal(await s.value('LastCancel'), null);
  s.cancel(sleep10, 'timeout');
  const stopped = await s.activeReaches(0, 200);
  assert.ok(stopped < 200, `stopped ${stopped} ms after the cancel`);
  assert.deepEqual(await s.value('LastCancel'), { correlation_id: sleep10.correlation_id, reason: 'timeout' });
  // The cancelled request is not answered: the next frame is the next reply.
  assert.deepEqual(await s.value('Ping'), {});
  assert.ok(await s.quiet(200), 'nothing for the cancelled request');
  for (const reason of ['cancelled', 'caller_exited', 'busy', 'shutting_down', 'a_reason_from_the_future']) {
    const r = s.request('Sleep', { ms: 10_000 });
    s.send(r);
    await s.activeReaches(1, 5000);
    s.cancel(r, reason);
    await s.activeReaches(0, 500);
    assert.equal((await s.value('LastCancel')).reason, reason);
  }
});

test('a cancel not from the broker, for another request, or malformed is ignored', async () => {
  const s = await start();
  const r = s.request('Sleep', { ms: 300 });
  s.send(r);
  await s.activeReaches(1, 5000);
  // Forged: from a process.
  s.send({ type: 'event', id: 'cancel', source: CALLER, target: ME, correlation_id: r.correlation_id,
    payload: { source: CALLER, reason: 'cancelled' } });
  // From the broker, for the same id of another requester, or an id nobody used.
  s.send({ type: 'event', id: 'cancel', source: 'broker', target: ME, correlation_id: r.correlation_id,
    payload: { source: 'client.9', reason: 'cancelled' } });
  s.send({ type: 'event', id: 'cancel', source: 'broker', target: ME, correlation_id: 424242,
    payload: { source: CALLER, reason: 'cancelled' } });
  // No payload, or not {source, reason}.
  s.send({ type: 'event', id: 'cancel', source: 'broker', target: ME, correlation_id: r.correlation_id });
  s.send({ type: 'event', id: 'cancel', source: 'broker', target: ME, correlation_id: r.correlation_id, payload: [1] });
  const reply = await s.next();
  assert.equal(reply.correlation_id, r.correlation_id);
  assert.equal(reply.payload.cancelled, false);
  assert.ok(reply.payload.slept_ms >= 290, JSON.stringify(reply.payload));
  assert.equal(await s.value('LastCancel'), null);
  assert.match(s.stderr, /cancel ignored/);
});

test('Count streams partials in order only to a stream request', async () => {
  const s = await start();
  const count = s.request('Count', { n: 5, delay_ms: 2 }, { stream: true });
  s.send(count);
  for (let i = 0; i < 5; i++) {
    const partial = await s.next();
    assert.deepEqual([partial.type, partial.more, partial.correlation_id, partial.id, partial.target],
      ['response', true, count.correlation_id, 'Count', CALLER]);
    assert.equal(partial.payload, i);
  }
  const last = await s.next();
  assert.equal(last.more, undefined);
  assert.equal(last.payload, 5);
  const plain = await s.call(s.request('Count', { n: 5 }));
  assert.equal(plain.more, undefined);
  assert.equal(plain.payload, 5);
  assert.deepEqual(await s.value('Ping'), {});
});

test('a cut stream stops producing', async () => {
  const s = await start();
  const count = s.request('Count', { n: 100_000, delay_ms: 5 }, { stream: true });
  s.send(count);
  for (let i = 0; i < 3; i++) assert.equal((await s.next()).more, true);
  s.cancel(count, 'busy');
  const quietFrom = performance.now();
  for (let body; (body = await s.nextBody(200)) !== null;) {
    assert.ok(performance.now() - quietFrom < 2000, 'still streaming');
    s.bodies.unshift(body);
    const f = await s.next();
    assert.equal(f.more, true, `no final reply after the cut: ${JSON.stringify(f, big)}`);
  }
  assert.deepEqual(await s.value('LastCancel'), { correlation_id: count.correlation_id, reason: 'busy' });
});

test('eight sleeps run at once', async () => {
  const s = await start();
  const sleeps = Array.from({ length: 8 }, () => s.request('Sleep', { ms: 200 }));
  const started = performance.now();
  for (const r of sleeps) s.send(r);
  const answered = [];
  while (answered.length < 8) {
    const reply = await s.next();
    assert.equal(reply.payload.cancelled, false);
    answered.push(reply.correlation_id);
  }
  const took = performance.now() - started;
  assert.ok(took < 600, `8 × Sleep 200 took ${took} ms`);
  assert.deepEqual(answered.sort(), sleeps.map((r) => r.correlation_id).sort());
});

test('calls out carry the budget left, errors come back, a cancel is passed on', async () => {
  const s = await start();
  const relay = s.request('Relay', { target: 'echo', method: 'Echo', payload: 'hi' }, { timeout_ms: 5000 });
  s.send(relay);
  const out = await s.next();
  assert.deepEqual([out.type, out.target, out.id], ['request', 'echo', 'Echo']);
  assert.ok(out.timeout_ms >= 4000 && out.timeout_ms <= 5000, `${out.timeout_ms}`);
  assert.equal(out.payload, 'hi');
  s.send({ type: 'response', id: out.id, correlation_id: out.correlation_id, source: 'echo.0', target: ME, payload: 'hi' });
  const reply = await s.next();
  assert.equal(reply.correlation_id, relay.correlation_id);
  assert.equal(reply.payload, 'hi');

  // A payload relayed verbatim, and none relayed as none.
  const odd = s.request('Relay');
  s.write(frame(Buffer.from(encode({ ...odd, payload: new Raw(Uint8Array.from([0x82, 0xa6, ...Buffer.from('target'), 0xa4, ...Buffer.from('echo'), 0xa6, ...Buffer.from('method'), 0xa1, 0x4d])) }))));
  const bare = await s.next();
  assert.equal('payload' in bare, false, 'no payload relayed as none');
  s.send({ type: 'response', id: bare.id, correlation_id: bare.correlation_id, source: 'echo.0', target: ME,
    payload: new Raw(Uint8Array.from([0xcd, 0x00, 0x01])) });
  const oddReply = await s.next();
  assert.equal(oddReply.correlation_id, odd.correlation_id);
  assert.deepEqual([...(rawField(oddReply.body, 'payload'))], [0xcd, 0x00, 0x01]);

  // The callee's error comes back with its code and message.
  const failing = s.request('Relay', { target: 'echo', method: 'Echo' });
  s.send(failing);
  const out2 = await s.next();
  s.send({ type: 'error', id: out2.id, correlation_id: out2.correlation_id, source: 'echo.0', target: ME,
    code: 'teapot', error: 'short and stout' });
  const error = await s.next();
  assert.deepEqual([error.correlation_id, error.type, error.code, error.error],
    [failing.correlation_id, 'error', 'teapot', 'short and stout']);

  // The Relay is cancelled: its call out is cancelled at the broker.
  const slow = s.request('Relay', { target: 'slow', method: 'Wait' });
  s.send(slow);
  const out3 = await s.next();
  s.cancel(slow, 'caller_exited');
  const cancel = await s.next();
  assert.deepEqual([cancel.type, cancel.id, cancel.target, cancel.correlation_id, 'payload' in cancel],
    ['event', 'cancel', 'broker', out3.correlation_id, false]);
  assert.deepEqual(await s.value('LastCancel'), { correlation_id: slow.correlation_id, reason: 'caller_exited' });
  // The late reply to the call out is dropped; nothing else comes.
  s.send({ type: 'response', id: out3.id, correlation_id: out3.correlation_id, source: 'slow.0', target: ME });
  assert.ok(await s.quiet(200));
});

test('events both ways', async () => {
  const s = await start();
  assert.equal(await s.value('LastNote'), null);
  s.send({ type: 'event', id: 'note', source: 'client.3', target: ME, payload: { n: [1, 2] } });
  assert.deepEqual(await s.value('LastNote'), { n: [1, 2] });
  const notify = s.request('Notify', { target: 'client.3', event: 'note', payload: [true] });
  s.send(notify);
  const event = await s.next();
  assert.deepEqual([event.type, event.id, event.target, event.payload], ['event', 'note', 'client.3', [true]]);
  const reply = await s.next();
  assert.equal(reply.correlation_id, notify.correlation_id);
  assert.deepEqual([...(rawField(reply.body, 'payload'))], [0xc0], 'replies nil');
});

test('a request with a key is served like any other', async () => {
  const s = await start();
  assert.equal(await s.value('Echo', 'k', { key: 'session-1' }), 'k');
  assert.equal(await s.value('Echo', 'k', { key: 1 }), 'k', 'an invalid key is the broker\'s business');
});

test('shutdown only from the broker, then drain and exit', async () => {
  const s = await start();
  s.send({ type: 'event', id: 'shutdown', source: CALLER, target: ME });
  assert.deepEqual(await s.value('Ping'), {});
  assert.equal(s.child.exitCode, null);
  const r = s.request('Sleep', { ms: 200 });
  s.send(r);
  await s.activeReaches(1, 5000);
  s.send({ type: 'event', id: 'shutdown', source: 'broker', target: ME });
  // No new calls out once shutdown was read.
  const relay = s.request('Relay', { target: 'echo', method: 'Echo' });
  s.send(relay);
  const refused = await s.next();
  assert.deepEqual([refused.correlation_id, refused.type, refused.code], [relay.correlation_id, 'error', 'shutting_down']);
  const reply = await s.next();
  assert.equal(reply.correlation_id, r.correlation_id);
  assert.equal(reply.payload.cancelled, false);
  const { code } = await s.exit(2000);
  assert.equal(code, 0, 'exits once drained, without waiting for EOF');
});

test('exit within a second of EOF with a handler still running', async () => {
  const s = await start();
  s.send(s.request('Sleep', { ms: 60_000 }));
  await s.activeReaches(1, 5000);
  const closed = performance.now();
  s.eof();
  const { code, at } = await s.exit(1000);
  assert.equal(code, 0);
  assert.ok(at - closed < 1000, `exited ${at - closed} ms after EOF`);
});

test('20 000 pipelined calls, exactly one reply each', async () => {
  const s = await start();
  const n = 20_000;
  const parts = [];
  for (let i = 1; i <= n; i++) {
    parts.push(frame(Buffer.from(encode({ type: 'request', id: i % 2 ? 'Echo' : 'Ping', correlation_id: i,
      source: CALLER, target: ME, payload: i }))));
  }
  s.write(Buffer.concat(parts));
  const seen = new Uint8Array(n + 1);
  for (let i = 0; i < n; i++) {
    const reply = await s.next(10_000);
    assert.equal(reply.type, 'response');
    seen[reply.correlation_id]++;
    if (reply.correlation_id % 2) assert.equal(reply.payload, reply.correlation_id);
  }
  assert.ok(seen.slice(1).every((c) => c === 1), 'one reply each');
  assert.ok(await s.quiet(100));
});
