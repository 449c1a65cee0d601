#!/usr/bin/env node
// The conformance subject of the Node SDK: the methods a conformance kit
// calls to check an SDK (PROTOCOL.md lists them), written with the SDK
// alone. State is per process.
//
//   procbroker conformance -- node sdk/node/conformance/subject.mjs

import { setTimeout as sleep } from 'node:timers/promises';
import { performance } from 'node:perf_hooks';

import { CallError, Service } from '../index.js';

const svc = new Service();

/** `Sleep` handlers still running. */
let sleeping = 0;
/** `{correlation_id, reason}` of the last cancel from the broker that reached a handler. */
let lastCancel = null;
/** The raw payload of the last `note` event (null: none yet, or it had none). */
let lastNote = null;

function noteCancel(ctx) {
  if (ctx.cancelled) lastCancel = { correlation_id: ctx.correlationId, reason: ctx.cancelReason };
}

/** The payload as a map, or `bad_request`. */
function params(payload) {
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload) || payload instanceof Uint8Array) {
    throw new CallError('bad_request', 'the payload must be a map');
  }
  return payload;
}

function whole(value, name) {
  if (typeof value === 'bigint') return Number(value);
  if (!Number.isInteger(value) || value < 0) {
    throw new CallError('bad_request', `${JSON.stringify(name)} must be a non-negative int`);
  }
  return value;
}

/** A str field of a raw map payload, or `bad_request`. */
function field(raw, name) {
  let value;
  try {
    value = raw?.get(name)?.decode();
  } catch (err) {
    throw new CallError('bad_request', `the payload must be a map: ${err.message}`);
  }
  if (typeof value !== 'string') throw new CallError('bad_request', `${JSON.stringify(name)} is missing or not a str`);
  return value;
}

svc.method('Echo', (raw) => raw, { decode: false });

svc.method('Sleep', async (payload, ctx) => {
  const ms = whole(params(payload).ms, 'ms');
  sleeping++;
  const started = performance.now();
  let cancelled = false;
  try {
    await sleep(ms, undefined, { signal: ctx.signal });
  } catch {
    cancelled = true;
    noteCancel(ctx);
  } finally {
    sleeping--;
  }
  return { slept_ms: Math.floor(performance.now() - started), cancelled };
});

svc.method('Active', () => ({ sleeping }));

svc.method('Count', async function* (payload, ctx) {
  const n = whole(params(payload).n, 'n');
  const delay = whole(params(payload).delay_ms ?? 0, 'delay_ms');
  try {
    for (let i = 0; i < n; i++) {
      if (i > 0 && delay > 0) await sleep(delay, undefined, { signal: ctx.signal });
      yield i;
    }
    return n;
  } finally {
    noteCancel(ctx);
  }
});

svc.method('Fail', (payload) => {
  const { code, message } = params(payload);
  throw new CallError(code ?? 'handler', String(message ?? ''));
});

svc.method('Deadline', (_payload, ctx) => ctx.remainingMs() ?? null);

svc.method('WhoAmI', () => ({ id: svc.processId, pid: process.pid }));

svc.method('Relay', async (raw, ctx) => {
  const target = field(raw, 'target');
  const method = field(raw, 'method');
  const payload = raw.get('payload');
  const left = ctx.remainingMs();
  try {
    return await svc.call(target, method, payload, {
      raw: true,
      signal: ctx.signal,
      timeoutMs: left === undefined ? undefined : Math.max(1, left),
    });
  } catch (err) {
    noteCancel(ctx);
    throw err;
  }
}, { decode: false });

svc.method('Notify', (raw) => {
  svc.emit(field(raw, 'target'), field(raw, 'event'), raw.get('payload'));
  return null;
}, { decode: false });

svc.method('LastCancel', () => lastCancel);

svc.method('LastNote', () => lastNote);

svc.on('note', (raw) => {
  lastNote = raw ?? null;
}, { decode: false });

await svc.run();
