// The calling side, in process: a Service on streams the test reads and
// writes as the broker would. Calls (deadline, key, raw, errors), their
// cancellation by AbortSignal, streams in, events out, and what `shutdown`
// and EOF do to calls in flight.

import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';

import { CallError, Raw, STREAM_BUFFER, Service, encode } from '../index.js';
import { decodeEnvelope, frame, splitFrames, sleep } from './helpers.mjs';

/** A running service `me.0` whose broker is the test. */
async function wired(setup = () => {}) {
  const input = new PassThrough();
  const output = new PassThrough();
  const lines = [];
  const svc = new Service({ input, output, processId: 'me.0', log: (line) => lines.push(line) });
  setup(svc);
  const broker = { svc, input, output, lines, buf: Buffer.alloc(0), frames: [], waiters: [], ended: false };
  output.on('data', (chunk) => {
    broker.buf = Buffer.concat([broker.buf, chunk]);
    const [bodies, rest] = splitFrames(broker.buf);
    broker.buf = rest;
    for (const body of bodies) broker.frames.push(decodeEnvelope(body));
    for (const w of broker.waiters.splice(0)) w();
  });
  output.on('end', () => {
    broker.ended = true;
    for (const w of broker.waiters.splice(0)) w();
  });
  broker.next = async (ms = 2000) => {
    const deadline = performance.now() + ms;
    while (broker.frames.length === 0) {
      const left = deadline - performance.now();
      if (left <= 0 || broker.ended) throw new Error(`no frame within ${ms} ms`);
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        broker.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return broker.frames.shift();
  };
  broker.send = (envelope) => input.write(frame(Buffer.from(encode({ target: 'me.0', ...envelope }))));
  broker.answer = (request, fields) => broker.send({
    type: 'response', id: request.id, correlation_id: request.correlation_id, source: `${request.target}.0`, ...fields,
  });
  broker.running = svc.run();
  const ready = await broker.next();
  assert.deepEqual([ready.type, ready.id, ready.target], ['event', 'ready', 'broker']);
  return broker;
}

test('a call carries its deadline, key and payload, and resolves with the reply', async () => {
  const b = await wired();
  const call = b.svc.call('store', 'Get', { k: 2n ** 63n }, { timeoutMs: 1500, key: 'user-7' });
  const request = await b.next();
  assert.deepEqual(
    [request.type, request.target, request.id, request.timeout_ms, request.key, request.stream, request.payload],
    ['request', 'store', 'Get', 1500, 'user-7', undefined, { k: 2n ** 63n }],
  );
  b.answer(request, { payload: { v: [1, 'two', 2n ** 64n - 1n] } });
  assert.deepEqual(await call, { v: [1, 'two', 2n ** 64n - 1n] });
  // The default deadline is 30 s; no payload, none sent; no reply payload, undefined.
  const bare = b.svc.call('store', 'Count');
  const r2 = await b.next();
  assert.equal(r2.timeout_ms, 30_000);
  assert.equal('payload' in r2, false);
  assert.notEqual(r2.correlation_id, request.correlation_id);
  b.answer(r2, {});
  assert.equal(await bare, undefined);
  // raw: the reply's bytes as they came; a Raw payload goes out verbatim.
  const raw = b.svc.call('store', 'Get', new Raw(Uint8Array.of(0xcd, 0, 5)), { raw: true });
  const r3 = await b.next();
  assert.deepEqual([...r3.body.subarray(r3.body.length - 3)], [0xcd, 0, 5]);
  b.answer(r3, { payload: new Raw(Uint8Array.of(0xcd, 0, 9)) });
  const got = await raw;
  assert.ok(got instanceof Raw);
  assert.deepEqual([...got.bytes], [0xcd, 0, 9]);
  assert.equal(got.decode(), 9);
  assert.equal(b.svc.pendingCalls, 0);
});

test('an error reply rejects with its code, message and source', async () => {
  const b = await wired();
  const call = b.svc.call('store', 'Get', 1);
  const request = await b.next();
  b.send({ type: 'error', id: 'Get', correlation_id: request.correlation_id, source: 'broker', code: 'timeout', error: 'no reply in time' });
  const error = await call.then(() => null, (e) => e);
  assert.ok(error instanceof CallError);
  assert.deepEqual([error.code, error.message, error.source], ['timeout', 'no reply in time', 'broker']);
});

test('an aborted signal cancels the call at the broker; a late reply is dropped', async () => {
  const b = await wired();
  const ac = new AbortController();
  const call = b.svc.call('slow', 'Wait', undefined, { signal: ac.signal });
  const request = await b.next();
  ac.abort('the user went away');
  const error = await call.then(() => null, (e) => e);
  assert.ok(error instanceof CallError);
  assert.equal(error.code, 'cancelled');
  assert.match(error.message, /the user went away/);
  const cancel = await b.next();
  assert.deepEqual([cancel.type, cancel.id, cancel.target, cancel.correlation_id, 'payload' in cancel],
    ['event', 'cancel', 'broker', request.correlation_id, false]);
  b.answer(request, { payload: 1 });
  await sleep(20);
  assert.equal(b.svc.pendingCalls, 0);
  // Aborted before the call: nothing is sent.
  const early = await b.svc.call('slow', 'Wait', undefined, { signal: AbortSignal.abort() }).catch((e) => e);
  assert.equal(early.code, 'cancelled');
  // Answered, then aborted: nothing more is sent either.
  const ac2 = new AbortController();
  const answered = b.svc.call('slow', 'Wait', undefined, { signal: ac2.signal });
  const r2 = await b.next();
  b.answer(r2, { payload: 'ok' });
  assert.equal(await answered, 'ok');
  ac2.abort();
  const next = b.svc.call('slow', 'Next');
  assert.equal((await b.next()).id, 'Next', 'no cancel for an answered call');
  b.answer({ id: 'Next', correlation_id: r2.correlation_id + 1, target: 'slow' }, {});
  await next;
});

test('calls that cannot be made fail at once', async () => {
  const b = await wired();
  const bad = [
    [b.svc.call('s', 'M', 1, { key: 'k'.repeat(257) }), 'bad_request'],
    [b.svc.call('s', 'M', 1, { key: 7 }), 'bad_request'],
    [b.svc.call('s', 'M', 1, { timeoutMs: -1 }), 'bad_request'],
    [b.svc.call('', 'M'), 'bad_request'],
    [b.svc.call('s', 'M', () => 1), 'bad_request'],
    [b.svc.call('s', 'M', new Uint8Array(17 * 1024 * 1024)), 'too_large'],
  ];
  for (const [call, code] of bad) {
    const error = await call.then(() => null, (e) => e);
    assert.ok(error instanceof CallError, String(error));
    assert.equal(error.code, code, error.message);
  }
  assert.equal(b.svc.pendingCalls, 0);
  assert.equal(b.frames.length, 0, 'nothing was sent');
  const idle = new Service({ input: new PassThrough(), output: new PassThrough() });
  assert.equal((await idle.call('s', 'M').catch((e) => e)).code, 'unavailable');
});

test('with no reply at all, a call gives up after its deadline and a grace', async () => {
  const b = await wired();
  const started = performance.now();
  const error = await b.svc.call('void', 'M', null, { timeoutMs: 10 }).catch((e) => e);
  const waited = performance.now() - started;
  assert.equal(error.code, 'timeout');
  assert.ok(waited >= 1000 && waited < 1600, `${waited} ms`);
  assert.equal(b.svc.pendingCalls, 0);
});

test('a stream yields the partials in order, then ends with the final reply', async () => {
  const b = await wired();
  const stream = b.svc.stream('counter', 'Count', { n: 3 }, { key: 'k' });
  const request = await b.next();
  assert.deepEqual([request.stream, request.key], [true, 'k']);
  assert.equal(stream.correlationId, BigInt(request.correlation_id));
  for (let i = 0; i < 3; i++) b.answer(request, { more: true, payload: i });
  b.answer(request, { payload: 'done' });
  const parts = [];
  for await (const part of stream) parts.push(part);
  assert.deepEqual(parts, [0, 1, 2]);
  assert.equal(await stream.result, 'done');
  // The final payload is the iterator's return value.
  const s2 = b.svc.stream('counter', 'Count');
  const r2 = await b.next();
  b.answer(r2, { more: true, payload: 'a' });
  b.answer(r2, { payload: 'z' });
  assert.deepEqual(await s2.next(), { value: 'a', done: false });
  assert.deepEqual(await s2.next(), { value: 'z', done: true });
  // An error reply ends it by throwing.
  const s3 = b.svc.stream('counter', 'Count');
  const r3 = await b.next();
  b.answer(r3, { more: true, payload: 1 });
  b.send({ type: 'error', id: 'Count', correlation_id: r3.correlation_id, source: 'counter.0', code: 'nope', error: 'stop' });
  const seen = [];
  const error = await (async () => {
    for await (const part of s3) seen.push(part);
  })().catch((e) => e);
  assert.deepEqual(seen, [1]);
  assert.deepEqual([error.code, error.message], ['nope', 'stop']);
  assert.equal((await s3.result.catch((e) => e)).code, 'nope');
});

test('leaving a stream early cancels it; a reader that falls behind cuts it', async () => {
  const b = await wired();
  const s = b.svc.stream('counter', 'Count');
  const request = await b.next();
  b.answer(request, { more: true, payload: 0 });
  for await (const part of s) {
    assert.equal(part, 0);
    break;
  }
  const cancel = await b.next();
  assert.deepEqual([cancel.id, cancel.target, cancel.correlation_id], ['cancel', 'broker', request.correlation_id]);
  assert.equal((await s.result.catch((e) => e)).code, 'cancelled');

  const slow = b.svc.stream('counter', 'Count');
  const r2 = await b.next();
  for (let i = 0; i <= STREAM_BUFFER; i++) b.answer(r2, { more: true, payload: i });
  const cut = await b.next();
  assert.deepEqual([cut.id, cut.correlation_id], ['cancel', r2.correlation_id]);
  let read = 0;
  const error = await (async () => {
    for await (const part of slow) assert.equal(part, read++);
  })().catch((e) => e);
  assert.equal(read, STREAM_BUFFER);
  assert.equal(error.code, 'busy');
});

test('a partial reply to a plain call is dropped', async () => {
  const b = await wired();
  const call = b.svc.call('s', 'M');
  const request = await b.next();
  b.answer(request, { more: true, payload: 'partial' });
  await sleep(10);
  assert.equal(b.svc.pendingCalls, 1, 'still waiting for its reply');
  b.answer(request, { payload: 'final' });
  assert.equal(await call, 'final');
});

test('emit sends events, a Raw payload verbatim', async () => {
  const b = await wired();
  assert.equal(b.svc.emit('client.3', 'note', { n: 1 }), undefined);
  b.svc.emit('*', 'hello');
  b.svc.emit('log', 'line', new Raw(Uint8Array.of(0xd9, 1, 0x41)));
  const e1 = await b.next();
  const e2 = await b.next();
  const e3 = await b.next();
  assert.deepEqual([e1.type, e1.id, e1.target, e1.payload], ['event', 'note', 'client.3', { n: 1 }]);
  assert.deepEqual([e2.id, e2.target, 'payload' in e2, 'correlation_id' in e2], ['hello', '*', false, false]);
  assert.deepEqual([...e3.body.subarray(e3.body.length - 3)], [0xd9, 1, 0x41]);
  assert.throws(() => b.svc.emit('', 'x'), TypeError);
});

test('events reach their handler with the sender; a failing handler is logged', async () => {
  const seen = [];
  const b = await wired((svc) => {
    svc.on('note', (payload, ctx) => seen.push([payload, ctx.source, ctx.method, [...ctx.rawPayload]]));
    svc.on('boom', () => {
      throw new Error('event handler bug');
    });
    svc.on('later', async () => {
      throw new Error('async event handler bug');
    });
  });
  b.send({ type: 'event', id: 'note', source: 'client.3', payload: [1] });
  b.send({ type: 'event', id: 'boom', source: 'client.3' });
  b.send({ type: 'event', id: 'later', source: 'client.3' });
  b.send({ type: 'event', id: 'unheard', source: 'client.3' });
  await sleep(20);
  assert.deepEqual(seen, [[[1], 'client.3', 'note', [0x91, 1]]]);
  assert.ok(b.lines.some((l) => l.includes('event handler bug')));
  assert.ok(b.lines.some((l) => l.includes('async event handler bug')));
});

test('after shutdown from the broker: calls in flight answered, no new calls, exit once idle', async () => {
  let release;
  const b = await wired((svc) => {
    svc.method('Work', async () => {
      const v = await svc.call('dep', 'Get');
      await new Promise((r) => (release = r));
      return v;
    });
  });
  b.send({ type: 'request', id: 'Work', correlation_id: 5, source: 'client.0' });
  const out = await b.next();
  assert.equal(out.id, 'Get');
  b.send({ type: 'event', id: 'shutdown', source: 'broker' });
  await sleep(10);
  assert.ok(b.svc.signal.aborted, 'svc.signal tells main');
  assert.equal((await b.svc.call('dep', 'Get').catch((e) => e)).code, 'shutting_down');
  b.answer(out, { payload: 'v' });
  await sleep(10);
  release();
  const reply = await b.next();
  assert.deepEqual([reply.correlation_id, reply.payload], [5, 'v']);
  assert.equal(await b.running, 0);
  assert.ok(b.ended, 'output closed');
});

test('at EOF calls in flight fail and handlers are cancelled with shutting_down', async () => {
  let ctxSeen;
  const b = await wired((svc) => {
    svc.method('Hold', (payload, ctx) => {
      ctxSeen = ctx;
      return new Promise((resolve) => ctx.signal.addEventListener('abort', () => resolve(ctx.signal.reason)));
    });
  });
  const call = b.svc.call('dep', 'Get');
  await b.next();
  b.send({ type: 'request', id: 'Hold', correlation_id: 9, source: 'client.0' });
  await sleep(10);
  b.input.end();
  const error = await call.catch((e) => e);
  assert.equal(error.code, 'shutting_down');
  assert.equal(ctxSeen.cancelReason, 'shutting_down');
  // Its reply still goes out: nobody said its caller stopped waiting.
  const reply = await b.next();
  assert.deepEqual([reply.correlation_id, reply.payload], [9, 'shutting_down']);
  assert.equal(await b.running, 0);
  assert.equal((await b.svc.call('dep', 'Get').catch((e) => e)).code, 'shutting_down');
});

test('main runs once ready, and serving goes on after it returns', async () => {
  const input = new PassThrough();
  const output = new PassThrough();
  const svc = new Service({ input, output, processId: 'me.0', log: () => {} });
  svc.method('Echo', (x) => x);
  let mainRan = false;
  const running = svc.run(async (s) => {
    assert.equal(s, svc);
    mainRan = true;
  });
  const until = async (cond) => {
    for (let waited = 0; !cond() && waited < 2000; waited += 5) await sleep(5);
  };
  await until(() => mainRan);
  assert.ok(mainRan);
  input.write(frame(Buffer.from(encode({ type: 'request', id: 'Echo', correlation_id: 1, source: 'c.0', payload: 3 }))));
  let out = Buffer.alloc(0);
  await until(() => {
    const chunk = output.read();
    if (chunk !== null) out = Buffer.concat([out, chunk]);
    return splitFrames(out)[0].length >= 2;
  });
  const [bodies] = splitFrames(out);
  assert.deepEqual(bodies.map((b) => decodeEnvelope(b).id), ['ready', 'Echo']);
  input.end();
  assert.equal(await running, 0);
  await assert.rejects(svc.run(), /already/);
});
