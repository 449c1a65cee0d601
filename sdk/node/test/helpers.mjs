// Test helpers: a service process driven over real pipes (FIFOs, as the
// broker gives its children), the test playing the broker.

import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Raw, decode, encode } from '../index.js';

export const SDK = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const REPO = path.resolve(SDK, '..', '..');
export const SUBJECT = path.join(SDK, 'conformance', 'subject.mjs');
export const FIXTURE = path.join(SDK, 'test', 'fixtures', 'service.mjs');

/** The process id the tests give the service. */
export const ME = 'subject.0';
/** The requester the tests play besides the broker. */
export const CALLER = 'client.0';

/** A frame: 4-byte big-endian length, then the body. */
export function frame(body) {
  const out = Buffer.alloc(4 + body.length);
  out.writeUInt32BE(body.length, 0);
  Buffer.from(body.buffer, body.byteOffset, body.byteLength).copy(out, 4);
  return out;
}

/** The frame of an envelope given as an object (payload a JS value, or `raw` bytes). */
export function envelopeFrame(envelope) {
  return frame(encode(envelope));
}

/** Splits `buf` into frame bodies; returns [bodies, rest]. */
export function splitFrames(buf) {
  const bodies = [];
  let pos = 0;
  while (pos + 4 <= buf.length) {
    const n = buf.readUInt32BE(pos);
    if (pos + 4 + n > buf.length) break;
    bodies.push(buf.subarray(pos + 4, pos + 4 + n));
    pos += 4 + n;
  }
  return [bodies, buf.subarray(pos)];
}

/**
 * The raw bytes of the value under key `name` in an encoded map (found by
 * walking it with the SDK's own Raw), to compare payloads byte for byte.
 */
export function rawField(body, name) {
  return new Raw(body).get(name)?.bytes;
}

const KEYS = ['type', 'id', 'correlation_id', 'source', 'target', 'timeout_ms', 'stream', 'more', 'key', 'error', 'code'];

/**
 * An envelope body as an object: its fields decoded, the payload too when
 * it has a JavaScript form (`payloadError` says why not), `body` the bytes.
 */
export function decodeEnvelope(body) {
  const raw = new Raw(body);
  const envelope = {};
  for (const key of KEYS) {
    const field = raw.get(key);
    if (field !== undefined) envelope[key] = field.decode();
  }
  const payload = raw.get('payload');
  if (payload !== undefined) {
    try {
      envelope.payload = payload.decode();
    } catch (err) {
      envelope.payloadError = err.message;
    }
  }
  Object.defineProperty(envelope, 'body', { value: body, enumerable: false });
  return envelope;
}

/**
 * A service process on real pipes. `frames` are decoded as they come;
 * `next()` waits for the next one. Everything written to stdout must be
 * frames: `rest` holds bytes after the last whole frame.
 */
export class Peer {
  /**
   * @param {string[]} argv the command (default: node subject.mjs)
   * @param {object} [env] extra environment
   */
  constructor(argv = [process.execPath, SUBJECT], env = {}) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pb-node-sdk-'));
    const fifoIn = path.join(dir, 'in');
    const fifoOut = path.join(dir, 'out');
    execFileSync('mkfifo', [fifoIn, fifoOut]);
    const { O_RDONLY, O_WRONLY, O_NONBLOCK } = fs.constants;
    const inRead = fs.openSync(fifoIn, O_RDONLY | O_NONBLOCK);
    const inWrite = fs.openSync(fifoIn, O_WRONLY);
    const outRead = fs.openSync(fifoOut, O_RDONLY | O_NONBLOCK);
    const outWrite = fs.openSync(fifoOut, O_WRONLY);
    this.child = spawn(argv[0], argv.slice(1), {
      stdio: [inRead, outWrite, 'pipe'],
      env: { ...process.env, PROCBROKER_PROCESS_ID: ME, PROCBROKER_SERVICE: 'subject', ...env },
    });
    fs.closeSync(inRead);
    fs.closeSync(outWrite);
    fs.rmSync(dir, { recursive: true });
    this.stdin = new net.Socket({ fd: inWrite, readable: false, writable: true });
    this.stdin.on('error', () => {});
    this.stdout = new net.Socket({ fd: outRead, readable: true, writable: false });
    this.stderr = '';
    this.child.stderr.setEncoding('utf8');
    this.child.stderr.on('data', (s) => {
      this.stderr += s;
    });
    this.buf = Buffer.alloc(0);
    this.bodies = [];
    this.waiters = [];
    this.closed = false;
    this.nextId = 100;
    this.stdout.on('data', (chunk) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
      const [bodies, rest] = splitFrames(this.buf);
      this.buf = rest;
      for (const body of bodies) this.bodies.push(body);
      this.wake();
    });
    this.stdout.on('end', () => {
      this.closed = true;
      this.wake();
    });
    this.exited = new Promise((resolve) => {
      this.child.on('exit', (code, signal) => resolve({ code, signal, at: performance.now() }));
    });
  }

  wake() {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  /** Starts the service and waits for its `ready`. */
  static async start(argv, env) {
    const peer = new Peer(argv, env);
    const ready = await peer.next(10_000);
    if (ready.type !== 'event' || ready.id !== 'ready' || ready.target !== 'broker') {
      throw new Error(`expected the ready event, got ${JSON.stringify(ready)}`);
    }
    return peer;
  }

  /** Writes bytes to the service's stdin. */
  write(bytes) {
    this.stdin.write(bytes);
  }

  /** Sends an envelope (an object; `source` as the broker would stamp it). */
  send(envelope) {
    this.write(envelopeFrame(envelope));
  }

  /** The next frame body the service wrote, within `ms` (null at EOF or time-out). */
  async nextBody(ms = 5000) {
    const deadline = performance.now() + ms;
    while (this.bodies.length === 0) {
      if (this.closed) return null;
      const left = deadline - performance.now();
      if (left <= 0) return null;
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return this.bodies.shift();
  }

  /** The next envelope the service wrote, decoded; throws if none within `ms`. */
  async next(ms = 5000, what = 'a frame') {
    const body = await this.nextBody(ms);
    if (body === null) throw new Error(`no ${what} within ${ms} ms (stderr: ${this.stderr.slice(-2000)})`);
    return decodeEnvelope(body);
  }

  /** Whether no frame comes within `ms`. */
  async quiet(ms) {
    const body = await this.nextBody(ms);
    if (body !== null) this.bodies.unshift(body);
    return body === null;
  }

  /** A request from `client.0` to the service, with a fresh correlation id. */
  request(method, payload, extra = {}) {
    const envelope = {
      type: 'request', id: method, correlation_id: ++this.nextId, source: CALLER, target: ME, ...extra,
    };
    if (payload !== undefined) envelope.payload = payload;
    return envelope;
  }

  /** Sends `request` and returns its reply (any other frame first is a failure). */
  async call(request, ms = 5000) {
    this.send(request);
    const reply = await this.next(ms, `reply to ${request.id}`);
    if (BigInt(reply.correlation_id) !== BigInt(request.correlation_id) || reply.target !== request.source) {
      throw new Error(`expected the reply to ${request.id} #${request.correlation_id}, got ${JSON.stringify(reply, big)}`);
    }
    return reply;
  }

  /** `method` with `payload`: its reply's payload (throws on an error reply). */
  async value(method, payload, extra) {
    const reply = await this.call(this.request(method, payload, extra));
    if (reply.type !== 'response' || reply.more) throw new Error(`not a final response: ${JSON.stringify(reply, big)}`);
    return reply.payload;
  }

  /** The `cancel` the broker sends for `request`. */
  cancel(request, reason) {
    this.send({
      type: 'event', id: 'cancel', source: 'broker', target: ME, correlation_id: request.correlation_id,
      payload: { source: request.source, reason },
    });
  }

  /** Polls `Active` until it reads `n` (within `ms`); returns how long it took. */
  async activeReaches(n, ms) {
    const started = performance.now();
    for (;;) {
      const now = await this.value('Active');
      if (now.sleeping === n) return performance.now() - started;
      if (performance.now() - started > ms) throw new Error(`Active ${JSON.stringify(now)} after ${ms} ms, want ${n}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Closes stdin (EOF). */
  eof() {
    this.stdin.end();
  }

  /** Waits for the exit (at most `ms`), and for stdout's end. */
  async exit(ms = 5000) {
    let timer;
    const result = await Promise.race([
      this.exited,
      new Promise((resolve) => {
        timer = setTimeout(() => resolve(null), ms);
      }),
    ]);
    clearTimeout(timer);
    if (result === null) throw new Error(`still running ${ms} ms later (stderr: ${this.stderr.slice(-2000)})`);
    return result;
  }

  kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    this.stdin.destroy();
    this.stdout.destroy();
  }
}

/** JSON.stringify replacer for bigint. */
export function big(_key, value) {
  return typeof value === 'bigint' ? `${value}n` : value;
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * The environment for the broker: this one without PROCBROKER_BIN (the
 * broker reads every PROCBROKER_* variable as a setting and refuses one it
 * does not know).
 */
export function brokerEnv() {
  const env = { ...process.env };
  delete env.PROCBROKER_BIN;
  return env;
}

/**
 * The broker binary: $PROCBROKER_BIN, else the repository's release or
 * debug build. Throws (a failure, never a skip) when there is none.
 */
export function brokerBin() {
  const fromEnv = process.env.PROCBROKER_BIN;
  if (fromEnv) {
    if (!fs.existsSync(fromEnv)) throw new Error(`PROCBROKER_BIN=${fromEnv} does not exist`);
    return fromEnv;
  }
  for (const kind of ['release', 'debug']) {
    const candidate = path.join(REPO, 'target', kind, 'procbroker');
    if (fs.existsSync(candidate)) return candidate;
  }
  throw new Error(
    `no procbroker binary: set PROCBROKER_BIN, or build one (cargo build --release) so that ` +
    `${path.join(REPO, 'target', 'release', 'procbroker')} exists`,
  );
}
