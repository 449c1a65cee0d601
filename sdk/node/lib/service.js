// The service: reads frames from stdin, runs handlers, writes replies to
// stdout; makes calls and sends events through the broker.

import fs from 'node:fs';
import net from 'node:net';
import { performance } from 'node:perf_hooks';

import { CallError, HANDLER } from './errors.js';
import { Raw, decodePayload, encodeShared, spanRaw } from './msgpack.js';
import {
  DEFAULT_MAX_FRAME_BYTES, ERROR, EVENT, REQUEST, RESPONSE,
  EnvelopeError, Fields, FrameError, FrameReader, Outbox, TooLargeError,
  decodeEnvelope, salvageRequest, text,
} from './wire.js';

const BROKER = 'broker';
/** A call's deadline when the caller sets none (the broker's default too). */
export const DEFAULT_CALL_TIMEOUT_MS = 30_000;
/** How much longer than its deadline a call waits for the broker's `timeout`. */
const GRACE_MS = 1000;
/** How often calls past their deadline and grace are looked for. */
const SWEEP_MS = 250;
/** Partial replies a stream holds unread before it is cut (`busy`). */
export const STREAM_BUFFER = 1000;
/** After EOF on stdin, how long running handlers may take to finish. */
const EOF_GRACE_MS = 100;
/** At exit, how long stdout may take to accept the last frames. */
const FLUSH_LIMIT_MS = 500;
/** Marks the stdin socket that reads into our own blocks. */
const OWN_READS = Symbol('own reads');
/** Stdin is read into blocks of this size, at most READ_SIZE at a time. */
const READ_BLOCK = 256 * 1024;
const READ_SIZE = 64 * 1024;
/** Bytes queued for stdout past which a streaming handler waits. */
const HIGH_WATER = 1 << 20;
/** Longest routing key, in UTF-8 bytes. */
const MAX_KEY_BYTES = 256;
/** Partial replies a generator handler makes between two turns of the event loop. */
const YIELD_EVERY = 64;
/** `{}`: the answer to `Ping` when the service does not serve it. */
const EMPTY_MAP = Uint8Array.of(0x80);

const IDLE = 0;
const RUNNING = 1;
const DRAINING = 2;
const CLOSING = 3;
const CLOSED = 4;

/** Bytes of `value` to hold on to: a copy when the encoder's buffer is large. */
function payloadOf(value) {
  if (value instanceof Raw) return value.bytes;
  const bytes = encodeShared(value);
  return bytes.length >= 4096 ? bytes.slice() : bytes;
}

function isBroker(b, s, e) {
  return e - s === 6 && b[s] === 0x62 && b[s + 1] === 0x72 && b[s + 2] === 0x6f &&
    b[s + 3] === 0x6b && b[s + 4] === 0x65 && b[s + 5] === 0x72;
}

function describe(reason) {
  if (reason === undefined) return '';
  if (reason instanceof Error) return reason.message;
  return String(reason);
}

/**
 * A request as its handler sees it beyond the payload: who asked, by which
 * method, its deadline and its cancellation.
 */
export class Context {
  constructor(b, f, method, mono) {
    this._b = b;
    /** The method called (the request's `id`). */
    this.method = method;
    this._idH = f.idH;
    this._idE = f.idE;
    this._cid = f.cid;
    this._cidH = f.cidH;
    this._cidE = f.cidE;
    this._srcH = f.srcH;
    this._srcS = f.srcS;
    this._srcE = f.srcE;
    this._payS = f.payS;
    this._payE = f.payE;
    this._keyS = f.keyS;
    this._keyE = f.keyE;
    /** The request's `timeout_ms` as delivered (undefined when it had none). */
    this.timeoutMs = f.timeoutMs;
    this._mono = mono;
    /** Whether the caller takes partial replies (`stream = true`). */
    this.stream = f.stream;
    this._source = undefined;
    this._reason = undefined;
    this._ac = null;
    this._cancelled = false; // by the broker: the reply is not sent
    this._done = false;
    this._next = null; // another running request under the same correlation id
  }

  /** The requester's process id (`broker` for health checks). */
  get source() {
    if (this._source === undefined) {
      this._source = this._srcS >= 0 ? text(this._b, this._srcS, this._srcE) : '';
    }
    return this._source;
  }

  /** The request's correlation id (a u64). */
  get correlationId() {
    const c = this._cid;
    return typeof c === 'bigint' ? c : BigInt(c);
  }

  /** The payload's MessagePack bytes, undecoded (undefined when the request had none). */
  get rawPayload() {
    return this._payS >= 0 ? this._b.subarray(this._payS, this._payE) : undefined;
  }

  /** The request's routing key, if it carried a str one. */
  get key() {
    if (this._keyS < 0) return undefined;
    const b = this._b;
    const m = b[this._keyS];
    let s = this._keyS + 1;
    if (m === 0xd9) s += 1;
    else if (m === 0xda) s += 2;
    else if (m === 0xdb) s += 4;
    else if (m < 0xa0 || m > 0xbf) return undefined;
    return text(b, s, this._keyE);
  }

  /** When the caller stops waiting, in epoch ms (undefined without `timeout_ms`). */
  get deadline() {
    if (this.timeoutMs === undefined) return undefined;
    return performance.timeOrigin + this._mono + this.timeoutMs;
  }

  /** Whole milliseconds left before the deadline, rounded down (0 once past; undefined without one). */
  remainingMs() {
    if (this.timeoutMs === undefined) return undefined;
    return Math.max(0, Math.floor(this._mono + this.timeoutMs - performance.now()));
  }

  /**
   * Aborted when the broker cancels the request (`signal.reason` is why:
   * `timeout`, `cancelled`, `caller_exited`, `busy`, `shutting_down`) or
   * when stdin closes (`shutting_down`).
   */
  get signal() {
    if (this._ac === null) {
      this._ac = new AbortController();
      if (this._reason !== undefined) this._ac.abort(this._reason);
    }
    return this._ac.signal;
  }

  /** Whether the request was cancelled. */
  get cancelled() {
    return this._reason !== undefined;
  }

  /** Why the request was cancelled, if it was. */
  get cancelReason() {
    return this._reason;
  }

  _cancel(reason) {
    if (this._reason !== undefined) return false;
    this._reason = reason;
    if (this._ac !== null) this._ac.abort(reason);
    return true;
  }
}

/** What an event handler knows of its event besides the payload. */
export class EventContext {
  constructor(source, method, b, payS, payE) {
    /** The sender's process id. */
    this.source = source;
    /** The event's name. */
    this.method = method;
    this._b = b;
    this._payS = payS;
    this._payE = payE;
  }

  /** The payload's MessagePack bytes (undefined when the event had none). */
  get rawPayload() {
    return this._payS >= 0 ? this._b.subarray(this._payS, this._payE) : undefined;
  }
}

/** A call waiting for its reply. */
class Pending {
  constructor(resolve, reject, raw, stream, giveUp, waited) {
    this.resolve = resolve;
    this.reject = reject;
    this.raw = raw;
    this.stream = stream;
    this.giveUp = giveUp;
    this.waited = waited;
    this.signal = null;
    this.onAbort = null;
  }

  detach() {
    if (this.signal !== null) this.signal.removeEventListener('abort', this.onAbort);
  }
}

/**
 * The replies of a streaming call (`svc.stream`): an async iterable of the
 * partial replies' payloads; it ends at the final reply, whose payload is
 * the iterator's return value and `result`. An error reply throws from the
 * iteration (and rejects `result`). Leaving the loop early cancels the call.
 */
export class CallStream {
  constructor(svc, target, method, payload, options) {
    this._svc = svc;
    this._queue = [];
    this._head = 0;
    this._waiter = null;
    this._end = null;
    this._thrown = false;
    this._raw = options.raw === true;
    this._cid = undefined;
    /** The final reply's payload (rejects with the call's CallError). */
    this.result = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.result.catch(() => {});
    this._cid = svc._submit(target, method, payload, options, this,
      (value) => this._finish({ value }), (error) => this._finish({ error }));
  }

  /** The call's correlation id (undefined if it was never sent). */
  get correlationId() {
    return this._cid === undefined ? undefined : BigInt(this._cid);
  }

  _partial(b, f) {
    if (this._queue.length - this._head >= STREAM_BUFFER) {
      this._svc._cut(this._cid);
      return;
    }
    this._queue.push(f.payS >= 0 ? spanRaw(b, f.payS, f.payE) : undefined);
    this._wake();
  }

  _finish(end) {
    if (this._end !== null) return;
    this._end = end;
    if ('error' in end) this._reject(end.error);
    else this._resolve(end.value);
    this._wake();
  }

  _wake() {
    const waiter = this._waiter;
    if (waiter !== null) {
      this._waiter = null;
      this._take(waiter.resolve, waiter.reject);
    }
  }

  _take(resolve, reject) {
    if (this._head < this._queue.length) {
      const raw = this._queue[this._head];
      this._queue[this._head++] = undefined;
      if (this._head > 1024 && this._head * 2 > this._queue.length) {
        this._queue = this._queue.slice(this._head);
        this._head = 0;
      }
      if (this._raw || raw === undefined) {
        resolve({ value: raw, done: false });
        return;
      }
      try {
        resolve({ value: raw.decode(), done: false });
      } catch (err) {
        this._svc._abort(this._cid, 'a partial reply did not decode');
        reject(new CallError('internal', `a partial reply does not decode: ${err.message}`));
      }
      return;
    }
    const end = this._end;
    if (end === null) {
      this._waiter = { resolve, reject };
      return;
    }
    if ('error' in end && !this._thrown) {
      this._thrown = true;
      reject(end.error);
      return;
    }
    resolve({ value: end.value, done: true });
  }

  /** The next partial payload, or `done` with the final reply's payload. */
  next() {
    return new Promise((resolve, reject) => this._take(resolve, reject));
  }

  /** Stops reading: a call still running is cancelled. */
  return(value) {
    if (this._end === null) this._svc._abort(this._cid, 'the stream was closed before its end');
    this._thrown = true;
    this._queue = [];
    this._head = 0;
    return Promise.resolve({ value, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/**
 * A service under procbroker: handlers by method name, event handlers,
 * and calls and events out. `run()` serves on stdin and stdout.
 */
export class Service {
  /**
   * @param {object} [options]
   * @param {string} [options.processId] this process's id (default: `PROCBROKER_PROCESS_ID`)
   * @param {number} [options.maxFrameBytes] largest frame read or written (16 MiB)
   * @param {import('node:stream').Readable} [options.input] frames in (default: stdin)
   * @param {import('node:stream').Writable} [options.output] frames out (default: stdout)
   * @param {boolean} [options.exit] end the process when serving ends (default: true on stdin/stdout)
   * @param {(line: string) => void} [options.log] where log lines go (default: stderr)
   */
  constructor(options = {}) {
    /** This process's id (`PROCBROKER_PROCESS_ID`, `standalone` outside the broker). */
    this.processId = options.processId ?? process.env.PROCBROKER_PROCESS_ID ?? 'standalone';
    /** This process's service name (`PROCBROKER_SERVICE`), if it has one. */
    this.serviceName = process.env.PROCBROKER_SERVICE;
    this._max = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this._input = options.input ?? null;
    this._output = options.output ?? null;
    this._stdio = options.input === undefined && options.output === undefined;
    this._exit = options.exit ?? this._stdio;
    this._logLine = options.log ?? ((line) => process.stderr.write(line + '\n'));
    this._methods = new Map();
    /** The method names read last, with their handlers (no string made per request). */
    this._seen = [];
    this._events = new Map();
    this._fields = new Fields();
    this._running = new Map();
    this._count = 0;
    this._pending = new Map();
    this._nextCid = 0;
    this._sweeper = null;
    this._state = IDLE;
    this._deaf = false;
    this._stopCalling = false;
    this._mono = 0;
    this._flushScheduled = false;
    this._onIdle = null;
    this._drainWaiters = [];
    this._out = null;
    this._backlog = () => 0;
    this._closing = new AbortController();
    this._flushNow = () => {
      this._flushScheduled = false;
      if (this._out !== null) this._out.flush();
    };
  }

  /** Aborted when the service stops serving: `shutdown` from the broker, or EOF. */
  get signal() {
    return this._closing.signal;
  }

  /**
   * Serves `name` with `handler(payload, ctx)`. It may return the reply's
   * payload (any MessagePack value; a `Raw` is sent verbatim; `undefined`
   * sends none), a promise of it, or be a generator / async generator: its
   * yields are partial replies (sent only to a caller that asked for a
   * stream) and its `return` value the final reply. Throwing replies an
   * error: a CallError's code and message, else code `handler`.
   * With `{decode: false}` the handler gets the payload as a `Raw`.
   */
  method(name, handler, options = {}) {
    if (typeof handler !== 'function') throw new TypeError(`the handler of ${name} must be a function`);
    this._methods.set(String(name), { fn: handler, decode: options.decode !== false });
    this._seen = [];
    return this;
  }

  /** Handles the event `name` with `handler(payload, ctx)`. */
  on(name, handler, options = {}) {
    if (typeof handler !== 'function') throw new TypeError(`the handler of ${name} must be a function`);
    this._events.set(String(name), { fn: handler, decode: options.decode !== false });
    return this;
  }

  /**
   * Announces `ready` and serves until EOF on stdin (or, after `shutdown`
   * from the broker, until the requests in flight are answered). `main`, if
   * given, runs once ready, and serving goes on after it returns. Resolves
   * with the exit status; then, on stdin/stdout, the process exits.
   */
  run(main) {
    if (this._state !== IDLE) return Promise.reject(new Error('run() was called already'));
    this._state = RUNNING;
    return new Promise((resolve) => {
      this._resolveRun = resolve;
      this._open();
      this._out.envelope({ type: EVENT, id: 'ready', target: BROKER });
      this._out.flush();
      if (typeof main === 'function') {
        setImmediate(() => {
          Promise.resolve()
            .then(() => main(this))
            .then(undefined, (err) => this._log(`main failed: ${err?.stack ?? err}`));
        });
      }
    });
  }

  /**
   * The sink of a pipe on `fd`: write(2) at once while nothing waits in the
   * socket's queue; what the pipe does not take goes to the queue.
   */
  _pipeSink(fd, out) {
    return (chunks) => {
      if (out.destroyed || out.writableEnded) return;
      let i = 0;
      if (out.writableLength === 0) {
        for (; i < chunks.length; i++) {
          const chunk = chunks[i];
          let written;
          try {
            written = fs.writeSync(fd, chunk, 0, chunk.length);
          } catch (err) {
            if (err.code !== 'EAGAIN') {
              out.destroy(err);
              return;
            }
            written = 0;
          }
          if (written < chunk.length) {
            chunks[i] = chunk.subarray(written);
            break;
          }
        }
      }
      for (; i < chunks.length; i++) out.write(chunks[i]);
    };
  }

  _log(message) {
    try {
      this._logLine(`procbroker ${this.processId}: ${message}`);
    } catch {
      // stderr is gone: nothing to tell
    }
  }

  _open() {
    let sink;
    if (this._output === null) {
      let stat = null;
      try {
        stat = fs.fstatSync(1);
      } catch {
        stat = null;
      }
      if (stat !== null && (stat.isFIFO() || stat.isSocket())) {
        // A pipe: written straight with write(2) while it takes everything
        // (libuv made it non-blocking), through the socket's queue (and its
        // 'drain') once it is full.
        this._output = new net.Socket({ fd: 1, readable: false, writable: true });
        sink = this._pipeSink(1, this._output);
      } else {
        sink = (chunks) => {
          for (const chunk of chunks) writeAllSync(1, chunk);
        };
      }
      // Whatever else writes to stdout (console.log) goes to stderr: stdout
      // carries frames only.
      Object.defineProperty(process, 'stdout', {
        configurable: true,
        enumerable: true,
        get: () => process.stderr,
      });
    }
    if (this._output !== null) {
      const out = this._output;
      out.on('error', (err) => {
        if (this._state < CLOSING) {
          this._log(`stdout failed: ${err.message}`);
          this._teardown(1);
        }
      });
      out.on('drain', () => this._wakeDrain());
      sink ??= (chunks) => {
        if (out.destroyed || out.writableEnded) return;
        if (chunks.length === 1) {
          out.write(chunks[0]);
          return;
        }
        out.cork();
        for (const chunk of chunks) out.write(chunk);
        out.uncork();
      };
      this._backlog = () => out.writableLength;
    }
    this._out = new Outbox(sink, this._max);
    this._reader = new FrameReader(this._max, (b, s, e) => this._onFrame(b, s, e));
    this._onData = (chunk) => this._data(chunk);
    this._onEnd = () => this._eof();
    this._onError = (err) => {
      this._log(`stdin failed: ${err.message}`);
      this._eof();
    };
    let input = this._input;
    if (input === null) input = this._stdinPipe();
    if (input === null) input = process.stdin;
    // A pipe read into our own blocks calls _data itself; anything else is a stream.
    if (!input[OWN_READS]) input.on('data', this._onData);
    this._input = input;
    input.on('end', this._onEnd);
    input.on('error', this._onError);
  }

  /**
   * Stdin as a socket that reads into blocks of our own, when it is a pipe:
   * each read lands after the previous one in a block (no allocation per
   * read, no stream machinery per chunk), and what a frame holds on to is
   * never written again. Null when stdin is not a pipe.
   */
  _stdinPipe() {
    let stat;
    try {
      stat = fs.fstatSync(0);
    } catch {
      return null;
    }
    if (!stat.isFIFO() && !stat.isSocket()) return null;
    let block = Buffer.allocUnsafe(READ_BLOCK);
    let used = 0;
    const next = () => {
      if (READ_BLOCK - used < READ_SIZE) {
        block = Buffer.allocUnsafe(READ_BLOCK);
        used = 0;
      }
      return block.subarray(used, used + READ_SIZE);
    };
    const socket = new net.Socket({
      fd: 0,
      readable: true,
      writable: false,
      onread: {
        buffer: next,
        callback: (nread, buf) => {
          used += nread;
          this._data(buf.subarray(0, nread));
        },
      },
    });
    socket[OWN_READS] = true;
    return socket;
  }

  _data(chunk) {
    if (this._state >= CLOSING) return;
    if (!Buffer.isBuffer(chunk)) {
      chunk = typeof chunk === 'string' ? Buffer.from(chunk, 'latin1')
        : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    }
    this._mono = performance.now();
    try {
      this._reader.push(chunk);
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      this._log(`stdin is out of sync: ${err.message}`);
      this._eof(1);
      return;
    }
    this._scheduleFlush();
  }

  _scheduleFlush() {
    if (!this._flushScheduled) {
      this._flushScheduled = true;
      setImmediate(this._flushNow);
    }
  }

  _onFrame(b, s, e) {
    if (this._state >= CLOSING) return;
    const f = this._fields;
    try {
      decodeEnvelope(b, s, e, f);
    } catch (err) {
      this._badFrame(b, s, e, err);
      return;
    }
    switch (f.type) {
      case REQUEST: this._request(b, f); break;
      case RESPONSE:
      case ERROR: this._reply(b, f); break;
      case EVENT: this._event(b, f); break;
    }
  }

  _badFrame(b, s, e, err) {
    const why = err instanceof EnvelopeError ? err.message : `not MessagePack: ${err.message}`;
    this._log(`invalid frame (${e - s} B) skipped: ${why}`);
    const salvaged = salvageRequest(b, s, e);
    if (salvaged === null) return;
    const id = salvaged.id !== null && salvaged.id[2] > salvaged.id[1]
      ? text(b, salvaged.id[1], salvaged.id[2]) : 'invalid';
    const target = salvaged.source !== null ? text(b, salvaged.source[1], salvaged.source[2]) : undefined;
    try {
      this._out.envelope({
        type: ERROR, id, cid: salvaged.cid, target, code: 'bad_request', error: `invalid request: ${why}`,
      });
      this._scheduleFlush();
    } catch (e2) {
      this._log(`cannot answer the invalid request: ${e2.message}`);
    }
  }

  /** The method named by b[s, e) and its handler: from the few names seen last, else the table. */
  _lookup(b, s, e) {
    const cache = this._seen;
    const n = e - s;
    outer: for (let i = 0; i < cache.length; i++) {
      const entry = cache[i];
      const name = entry.bytes;
      if (name.length !== n) continue;
      for (let j = 0; j < n; j++) if (name[j] !== b[s + j]) continue outer;
      return entry;
    }
    const method = text(b, s, e);
    const entry = { bytes: Uint8Array.prototype.slice.call(b, s, e), method, handler: this._methods.get(method) };
    if (cache.length >= 8) cache.pop();
    cache.unshift(entry);
    return entry;
  }

  _request(b, f) {
    const seen = this._lookup(b, f.idS, f.idE);
    const method = seen.method;
    const h = seen.handler;
    if (h === undefined) {
      if (method === 'Ping') {
        this._out.reply(b, f.idH, f.idE, f.cidH, f.cidE, f.srcH, f.srcE, false, EMPTY_MAP, 0, 1);
      } else {
        this._out.reply(b, f.idH, f.idE, f.cidH, f.cidE, f.srcH, f.srcE, false, undefined, 0, 0,
          'unknown_method', `no method ${JSON.stringify(method)}`);
      }
      return;
    }
    const ctx = new Context(b, f, method, this._mono);
    let payload;
    if (f.payS >= 0) {
      if (h.decode) {
        try {
          payload = decodePayload(b, f.payS, f.payE);
        } catch (err) {
          this._fail(ctx, 'bad_request', `the payload does not decode: ${err.message}`);
          return;
        }
      } else {
        payload = spanRaw(b, f.payS, f.payE);
      }
    }
    let result;
    try {
      result = h.fn(payload, ctx);
    } catch (err) {
      this._failWith(ctx, err);
      return;
    }
    if (result !== null && typeof result === 'object') {
      if (typeof result.then === 'function') {
        this._enter(ctx);
        result.then((value) => this._settled(ctx, value), (err) => this._rejected(ctx, err));
        return;
      }
      if (typeof result.next === 'function' &&
          (typeof result[Symbol.asyncIterator] === 'function' || typeof result[Symbol.iterator] === 'function')) {
        this._enter(ctx);
        this._drive(ctx, result);
        return;
      }
    }
    this._answer(ctx, result);
  }

  _settled(ctx, value) {
    if (this._leave(ctx)) this._answer(ctx, value);
    this._idle();
  }

  _rejected(ctx, err) {
    if (this._leave(ctx)) this._failWith(ctx, err);
    this._idle();
  }

  /** Runs a generator handler: partial replies, then its return value. */
  async _drive(ctx, gen) {
    let step;
    let turn = 0;
    try {
      for (;;) {
        step = await gen.next();
        if (step.done || ctx._cancelled || this._state >= CLOSING) break;
        if (ctx.stream) {
          this._send(ctx, step.value, true);
          this._scheduleFlush();
          if (this._backlog() >= HIGH_WATER) await this._belowHighWater();
        }
        // A generator that never waits on I/O would hold the event loop
        // in microtasks: give it a turn now and then, so the partials go
        // out and a `cancel` can be read.
        if (++turn === YIELD_EVERY) {
          turn = 0;
          await new Promise(setImmediate);
        }
      }
    } catch (err) {
      if (this._leave(ctx)) this._failWith(ctx, err);
      this._idle();
      return;
    }
    if (!step.done) {
      // Cancelled: the generator's `finally` blocks run; nothing more is sent.
      Promise.resolve().then(() => gen.return(undefined)).then(undefined, () => {});
      this._leave(ctx);
    } else if (this._leave(ctx)) {
      this._answer(ctx, step.value);
    }
    this._idle();
  }

  _belowHighWater() {
    return new Promise((resolve) => this._drainWaiters.push(resolve));
  }

  _wakeDrain() {
    if (this._backlog() >= HIGH_WATER / 2 && this._state < CLOSING) return;
    const waiters = this._drainWaiters;
    this._drainWaiters = [];
    for (const wake of waiters) wake();
  }

  _answer(ctx, value) {
    if (this._state >= CLOSING) return;
    try {
      this._send(ctx, value, false);
    } catch (err) {
      if (err instanceof TooLargeError) {
        this._fail(ctx, 'too_large', `the reply is too large: ${err.message}`);
      } else {
        this._fail(ctx, 'internal', `the handler's result does not encode: ${err.message}`);
      }
      return;
    }
    this._scheduleFlush();
  }

  /** Appends the reply (or partial reply) with payload `value` to request `ctx`. */
  _send(ctx, value, more) {
    let pb;
    let ps = 0;
    let pe = 0;
    if (value instanceof Raw) {
      if (value._bytes === null) {
        pb = value._src;
        ps = value._s;
        pe = value._e;
      } else {
        pb = value._bytes;
        pe = pb.length;
      }
    } else if (value !== undefined) {
      pb = payloadOf(value);
      pe = pb.length;
    }
    this._out.reply(ctx._b, ctx._idH, ctx._idE, ctx._cidH, ctx._cidE, ctx._srcH, ctx._srcE, more, pb, ps, pe);
  }

  _fail(ctx, code, message) {
    if (this._state >= CLOSING) return;
    if (message.length > 65536) message = message.slice(0, 65536) + '…';
    this._out.reply(ctx._b, ctx._idH, ctx._idE, ctx._cidH, ctx._cidE, ctx._srcH, ctx._srcE,
      false, undefined, 0, 0, code, message);
    this._scheduleFlush();
  }

  _failWith(ctx, err) {
    if (err instanceof CallError) {
      this._fail(ctx, err.code || HANDLER, String(err.message));
    } else if (err instanceof Error) {
      this._fail(ctx, HANDLER, err.message || err.name);
    } else {
      this._fail(ctx, HANDLER, String(err));
    }
  }

  _enter(ctx) {
    this._count++;
    const prev = this._running.get(ctx._cid);
    if (prev !== undefined) ctx._next = prev;
    this._running.set(ctx._cid, ctx);
  }

  /** The handler of `ctx` is done; true if its reply is to be sent. */
  _leave(ctx) {
    if (ctx._done) return false;
    ctx._done = true;
    this._count--;
    const head = this._running.get(ctx._cid);
    if (head === ctx) {
      if (ctx._next !== null) this._running.set(ctx._cid, ctx._next);
      else this._running.delete(ctx._cid);
    } else {
      let n = head;
      while (n !== undefined && n !== null && n._next !== ctx) n = n._next;
      if (n) n._next = ctx._next;
    }
    return !ctx._cancelled && this._state < CLOSING;
  }

  _idle() {
    if (this._count !== 0) return;
    if (this._onIdle !== null) {
      const onIdle = this._onIdle;
      this._onIdle = null;
      onIdle();
    } else if (this._state === DRAINING) {
      this._teardown(0);
    }
  }

  _reply(b, f) {
    const call = this._pending.get(f.cid);
    if (call === undefined) {
      this._debug(`reply to no call in flight dropped (correlation_id ${f.cid})`);
      return;
    }
    if (f.type === RESPONSE && f.more) {
      if (call.stream === null) {
        this._debug(`partial reply to a call that asked for no stream dropped (correlation_id ${f.cid})`);
        return;
      }
      call.stream._partial(b, f);
      return;
    }
    this._pending.delete(f.cid);
    call.detach();
    if (f.type === ERROR) {
      const source = f.srcS >= 0 ? text(b, f.srcS, f.srcE) : undefined;
      call.reject(new CallError(text(b, f.codeS, f.codeE), text(b, f.errS, f.errE), source));
      return;
    }
    if (f.payS < 0) {
      call.resolve(undefined);
    } else if (call.raw) {
      call.resolve(spanRaw(b, f.payS, f.payE));
    } else {
      let value;
      try {
        value = decodePayload(b, f.payS, f.payE);
      } catch (err) {
        call.reject(new CallError('internal', `the reply's payload does not decode: ${err.message}`));
        return;
      }
      call.resolve(value);
    }
  }

  _event(b, f) {
    const name = text(b, f.idS, f.idE);
    const fromBroker = f.srcS >= 0 && isBroker(b, f.srcS, f.srcE);
    if (name === 'cancel') {
      if (fromBroker) this._cancel(b, f);
      else this._debug('cancel not from the broker ignored');
      return;
    }
    if (name === 'shutdown' && fromBroker) {
      this._shutdown();
      return;
    }
    const h = this._events.get(name);
    if (h === undefined) return;
    const source = f.srcS >= 0 ? text(b, f.srcS, f.srcE) : '';
    const ctx = new EventContext(source, name, b, f.payS, f.payE);
    let payload;
    if (f.payS >= 0) {
      if (h.decode) {
        try {
          payload = decodePayload(b, f.payS, f.payE);
        } catch (err) {
          this._log(`event ${name} from ${source} skipped: its payload does not decode: ${err.message}`);
          return;
        }
      } else {
        payload = spanRaw(b, f.payS, f.payE);
      }
    }
    try {
      const r = h.fn(payload, ctx);
      if (r !== null && typeof r === 'object' && typeof r.then === 'function') {
        r.then(undefined, (err) => this._log(`event handler ${name} failed: ${err?.stack ?? err}`));
      }
    } catch (err) {
      this._log(`event handler ${name} failed: ${err?.stack ?? err}`);
    }
  }

  /** `cancel` from the broker: `{source, reason}` names the request with the event's correlation id. */
  _cancel(b, f) {
    let notice;
    try {
      notice = f.payS >= 0 ? decodePayload(b, f.payS, f.payE) : undefined;
    } catch {
      notice = undefined;
    }
    if (notice === null || typeof notice !== 'object' || typeof notice.source !== 'string' ||
        typeof notice.reason !== 'string') {
      this._log(`cancel ignored (correlation_id ${f.cid}): its payload is not {source, reason}`);
      return;
    }
    let ctx = this._running.get(f.cid);
    while (ctx !== undefined && ctx !== null && ctx.source !== notice.source) ctx = ctx._next;
    if (ctx === undefined || ctx === null) {
      this._debug(`cancel of no running request ignored (correlation_id ${f.cid}, from ${notice.source})`);
      return;
    }
    ctx._cancelled = true;
    ctx._cancel(notice.reason);
  }

  _shutdown() {
    if (this._state !== RUNNING) return;
    this._state = DRAINING;
    this._stopCalling = true;
    this._closing.abort('shutdown');
    this._idle();
  }

  /** EOF on stdin (or stdin out of sync: status 1): exit now, after a short grace. */
  _eof(status = 0) {
    if (this._state >= CLOSING || this._deaf) return;
    if (status === 0 && this._reader.buffered > 0) {
      this._log(`stdin ended inside a frame: ${this._reader.buffered} of ${this._reader.expected} bytes`);
      status = 1;
    }
    this._deaf = true;
    this._failPending(new CallError('shutting_down', 'stdin closed: no reply can come'));
    if (!this._closing.signal.aborted) this._closing.abort('eof');
    for (let ctx of this._running.values()) {
      for (; ctx !== null; ctx = ctx._next) ctx._cancel('shutting_down');
    }
    if (this._count === 0) {
      this._teardown(status);
      return;
    }
    const timer = setTimeout(() => {
      this._onIdle = null;
      this._teardown(status);
    }, EOF_GRACE_MS);
    this._onIdle = () => {
      clearTimeout(timer);
      // Let replies queued by the last handler's microtasks join the flush.
      setImmediate(() => this._teardown(status));
    };
  }

  _failPending(error) {
    const pending = this._pending;
    this._pending = new Map();
    for (const call of pending.values()) {
      call.detach();
      call.reject(error);
    }
  }

  /** Stops serving: the last frames out, stdout closed, `run()` resolved. */
  _teardown(status) {
    if (this._state >= CLOSING) return;
    this._state = CLOSING;
    this._deaf = true;
    if (!this._closing.signal.aborted) this._closing.abort('eof');
    if (this._sweeper !== null) {
      clearInterval(this._sweeper);
      this._sweeper = null;
    }
    this._failPending(new CallError('shutting_down', 'the service stopped serving'));
    const input = this._input;
    input.removeListener('data', this._onData);
    input.removeListener('end', this._onEnd);
    if (typeof input.pause === 'function') input.pause();
    if (this._stdio && typeof input.destroy === 'function') input.destroy();
    this._out.flush();
    const done = () => {
      if (this._state === CLOSED) return;
      this._state = CLOSED;
      for (const wake of this._drainWaiters) wake();
      this._drainWaiters = [];
      this._resolveRun(status);
      if (this._exit) setImmediate(() => process.exit(status));
    };
    const out = this._output;
    if (out === null || out.destroyed || out.writableFinished) {
      done();
      return;
    }
    const timer = setTimeout(done, FLUSH_LIMIT_MS);
    timer.unref?.();
    out.end(() => {
      clearTimeout(timer);
      done();
    });
  }

  _debug(message) {
    if (DEBUG) this._log(message);
  }

  /**
   * Calls `method` of `target` (a service name, a process id, or `broker`)
   * and resolves with the reply's payload (decoded, or a `Raw` with
   * `{raw: true}`; undefined when it had none). Rejects with a CallError:
   * the callee's or the broker's code, `cancelled` when `signal` aborts it.
   */
  call(target, method, payload, options = {}) {
    return new Promise((resolve, reject) => {
      this._submit(target, method, payload, options ?? {}, null, resolve, reject);
    });
  }

  /** Calls `method` of `target` asking for partial replies; see CallStream. */
  stream(target, method, payload, options = {}) {
    return new CallStream(this, target, method, payload, options ?? {});
  }

  /** Sends event `name` to `target` (a process, a service's every worker, or `*`). */
  emit(target, name, payload) {
    if (this._state === IDLE) throw new Error('the service is not running: call run() first');
    if (this._deaf || this._state >= CLOSING) return;
    if (typeof target !== 'string' || target === '' || typeof name !== 'string' || name === '') {
      throw new TypeError('emit(target, name, payload?) takes two non-empty strings');
    }
    const bytes = payload === undefined ? undefined : payloadOf(payload);
    try {
      this._out.envelope({ type: EVENT, id: name, target, payload: bytes });
    } catch (err) {
      if (err instanceof TooLargeError) throw new CallError('too_large', err.message);
      throw err;
    }
    this._scheduleFlush();
  }

  /** Queues a request; returns its correlation id, or undefined if it failed at once. */
  _submit(target, method, payload, options, stream, resolve, reject) {
    if (this._state === IDLE) {
      reject(new CallError('unavailable', 'the service is not running: call run() first'));
      return undefined;
    }
    if (this._deaf || this._stopCalling || this._state >= CLOSING) {
      reject(new CallError('shutting_down', 'the service is shutting down: no new calls'));
      return undefined;
    }
    if (typeof target !== 'string' || target === '' || typeof method !== 'string' || method === '') {
      reject(new CallError('bad_request', 'a call takes a target and a method, non-empty strings'));
      return undefined;
    }
    const { signal, key } = options;
    if (signal?.aborted) {
      reject(new CallError('cancelled', `the call was cancelled before it was sent: ${describe(signal.reason)}`));
      return undefined;
    }
    if (key !== undefined && (typeof key !== 'string' || Buffer.byteLength(key, 'utf8') > MAX_KEY_BYTES)) {
      reject(new CallError('bad_request', `the key must be a str of at most ${MAX_KEY_BYTES} bytes`));
      return undefined;
    }
    let timeoutMs = options.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    if (typeof timeoutMs !== 'number' || !(timeoutMs >= 0)) {
      reject(new CallError('bad_request', `timeoutMs must be a non-negative number, not ${timeoutMs}`));
      return undefined;
    }
    timeoutMs = Math.max(1, Math.ceil(Math.min(timeoutMs, Number.MAX_SAFE_INTEGER)));
    let bytes;
    if (payload !== undefined) {
      try {
        bytes = payloadOf(payload);
      } catch (err) {
        reject(new CallError('bad_request', `the payload does not encode: ${err.message}`));
        return undefined;
      }
    }
    const cid = ++this._nextCid;
    try {
      this._out.envelope({
        type: REQUEST, id: method, cid, target, timeoutMs, stream: stream !== null, key, payload: bytes,
      });
    } catch (err) {
      if (!(err instanceof TooLargeError)) throw err;
      reject(new CallError('too_large', err.message, this.processId));
      return undefined;
    }
    this._scheduleFlush();
    const waited = timeoutMs + GRACE_MS;
    const call = new Pending(resolve, reject, options.raw === true, stream, performance.now() + waited, waited);
    this._pending.set(cid, call);
    if (signal) {
      call.signal = signal;
      call.onAbort = () => this._abort(cid, signal.reason);
      signal.addEventListener('abort', call.onAbort, { once: true });
    }
    if (this._sweeper === null) {
      // Kept referenced: a call waiting for its reply keeps the process up.
      this._sweeper = setInterval(() => this._sweep(), SWEEP_MS);
    }
    return cid;
  }

  /** The caller gave up on call `cid`: the broker gets `cancel` for it. */
  _abort(cid, reason) {
    const call = this._pending.get(cid);
    if (call === undefined) return;
    this._pending.delete(cid);
    call.detach();
    this._sendCancel(cid);
    const why = describe(reason);
    call.reject(new CallError('cancelled', why ? `the call was cancelled: ${why}` : 'the call was cancelled'));
  }

  /** A stream's reader fell behind: the call is cancelled and ends `busy`. */
  _cut(cid) {
    const call = this._pending.get(cid);
    if (call === undefined) return;
    this._pending.delete(cid);
    call.detach();
    this._sendCancel(cid);
    call.reject(new CallError('busy', `the stream's reader fell ${STREAM_BUFFER} partial replies behind`,
      this.processId));
  }

  _sendCancel(cid) {
    if (this._deaf || this._state >= CLOSING) return;
    this._out.envelope({ type: EVENT, id: 'cancel', cid, target: BROKER });
    this._scheduleFlush();
  }

  _sweep() {
    const now = performance.now();
    for (const [cid, call] of this._pending) {
      if (call.giveUp <= now) {
        this._pending.delete(cid);
        call.detach();
        call.reject(new CallError('timeout', `no reply within ${call.waited} ms`, this.processId));
      }
    }
    if (this._pending.size === 0 && this._sweeper !== null) {
      clearInterval(this._sweeper);
      this._sweeper = null;
    }
  }

  /** Calls in flight (waiting for their reply). */
  get pendingCalls() {
    return this._pending.size;
  }
}

const DEBUG = /^(1|true|debug)$/i.test(process.env.PROCBROKER_SDK_DEBUG ?? '');

const sleeper = new Int32Array(new SharedArrayBuffer(4));

/** Writes all of `chunk` to `fd` (a file or a terminal: stdout that is not a pipe). */
function writeAllSync(fd, chunk) {
  let off = 0;
  while (off < chunk.length) {
    try {
      off += fs.writeSync(fd, chunk, off, chunk.length - off);
    } catch (err) {
      if (err.code !== 'EAGAIN') throw err;
      Atomics.wait(sleeper, 0, 0, 1);
    }
  }
}
