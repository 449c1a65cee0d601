#!/usr/bin/env node
// Worker CPU per call: pipes N `Echo` requests, `inflight` at a time, into
// each worker command given (the driver plays the broker) and reads the
// worker's CPU time from /proc (every thread's, from its `ready` to its
// last reply; what it used before `ready` is shown apart), in one run so
// the numbers compare. --rounds alternates the workers that many times and
// prints the median ratio to the first.
//
//   node bench/echo-cpu.mjs [--calls 50000] [--inflight 64] [--payload 64] \
//     --worker 'procbroker worker echo' --worker 'node conformance/subject.mjs'

import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

const args = process.argv.slice(2);
let calls = 50_000;
let inflight = 64;
let payloadBytes = 64;
let rounds = 1;
const workers = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--calls') calls = Number(args[++i]);
  else if (a === '--inflight') inflight = Number(args[++i]);
  else if (a === '--payload') payloadBytes = Number(args[++i]);
  else if (a === '--rounds') rounds = Number(args[++i]);
  else if (a === '--worker') workers.push(args[++i]);
  else throw new Error(`unknown argument ${a}`);
}
if (workers.length === 0) throw new Error('give at least one --worker COMMAND');

const TICK_NS = 1e9 / 100;

/** CPU time of every thread of `pid`, in ns (schedstat: ns precision). */
function cpuNs(pid) {
  let total = 0;
  let tasks;
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return NaN;
  }
  for (const t of tasks) {
    try {
      total += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread ended
    }
  }
  // Threads that already ended are in the process's stat (ticks) only.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = (Number(fields[11]) + Number(fields[12])) * TICK_NS;
  return Math.max(total, ticks);
}

/** A request as the broker delivers it, correlation id as a u32 at a known offset. */
function requestTemplate() {
  const parts = [];
  const str = (s) => {
    const b = Buffer.from(s);
    parts.push(Buffer.from([0xa0 | b.length]), b);
  };
  parts.push(Buffer.from([0x87]));
  str('type'); str('request');
  str('id'); str('Echo');
  str('correlation_id');
  const cidAt = parts.reduce((n, p) => n + p.length, 0) + 1;
  parts.push(Buffer.from([0xce, 0, 0, 0, 0]));
  str('source'); str('client.0');
  str('target'); str('worker.0');
  str('timeout_ms'); parts.push(Buffer.from([0xcd, 0x75, 0x30]));
  str('payload');
  const payload = Buffer.alloc(payloadBytes, 0x61);
  parts.push(Buffer.from([0xc4, payload.length]), payload);
  const body = Buffer.concat(parts);
  const frame = Buffer.alloc(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  return { frame, cidAt: 4 + cidAt };
}

async function measure(command) {
  const [cmd, ...rest] = command.split(' ').filter(Boolean);
  // Real pipes (FIFOs), as the broker gives its children, not the
  // socketpairs of child_process.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'echo-cpu-'));
  const fifoIn = path.join(dir, 'in');
  const fifoOut = path.join(dir, 'out');
  execFileSync('mkfifo', [fifoIn, fifoOut]);
  const { O_RDONLY, O_WRONLY, O_NONBLOCK } = fs.constants;
  const inRead = fs.openSync(fifoIn, O_RDONLY | O_NONBLOCK);
  const inWrite = fs.openSync(fifoIn, O_WRONLY);
  const outRead = fs.openSync(fifoOut, O_RDONLY | O_NONBLOCK);
  const outWrite = fs.openSync(fifoOut, O_WRONLY);
  const child = spawn(cmd, rest, {
    stdio: [inRead, outWrite, 'inherit'],
    env: { ...process.env, PROCBROKER_PROCESS_ID: 'worker.0' },
  });
  fs.closeSync(inRead);
  fs.closeSync(outWrite);
  fs.rmSync(dir, { recursive: true });
  const stdin = new net.Socket({ fd: inWrite, readable: false, writable: true });
  const stdout = new net.Socket({ fd: outRead, readable: true, writable: false });
  const { frame, cidAt } = requestTemplate();
  let sent = 0;
  let answered = 0;
  let ready = false;
  let started = 0;
  let cpuAtReady = 0;
  let buf = Buffer.alloc(0);
  let resolveDone;
  const done = new Promise((r) => (resolveDone = r));

  const sendBatch = (n) => {
    const out = Buffer.allocUnsafe(frame.length * n);
    for (let i = 0; i < n; i++) {
      frame.copy(out, i * frame.length);
      out.writeUInt32BE(++sent, i * frame.length + cidAt);
    }
    stdin.write(out);
  };

  stdout.on('data', (chunk) => {
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    let pos = 0;
    let replies = 0;
    while (pos + 4 <= buf.length) {
      const n = buf.readUInt32BE(pos);
      if (pos + 4 + n > buf.length) break;
      if (!ready) {
        ready = true;
        cpuAtReady = cpuNs(child.pid);
        started = performance.now();
      } else {
        replies++;
      }
      pos += 4 + n;
    }
    buf = buf.subarray(pos);
    if (!ready) return;
    answered += replies;
    const room = Math.min(calls - sent, inflight - (sent - answered));
    if (room > 0) sendBatch(room);
    if (answered === calls) resolveDone();
  });
  await done;
  const elapsed = performance.now() - started;
  const cpu = cpuNs(child.pid) - cpuAtReady;
  stdin.end();
  await new Promise((r) => child.on('exit', r));
  return { command, calls, cpuPerCallUs: cpu / calls / 1000, callsPerS: calls / (elapsed / 1000), startupMs: cpuAtReady / 1e6 };
}

const results = [];
for (let r = 0; r < rounds; r++) {
  for (const w of workers) results.push(await measure(w));
}
for (const r of results) {
  console.log(`${r.cpuPerCallUs.toFixed(2)} µs CPU/call  ${Math.round(r.callsPerS)} calls/s  (${r.startupMs.toFixed(0)} ms CPU before ready)  ${r.command}`);
}
if (workers.length > 1) {
  const by = new Map();
  for (const r of results) {
    if (!by.has(r.command)) by.set(r.command, []);
    by.get(r.command).push(r.cpuPerCallUs);
  }
  const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const base = med(by.get(workers[0]));
  for (const w of workers.slice(1)) {
    console.log(`ratio ${(med(by.get(w)) / base).toFixed(2)}× (median of ${rounds}): ${w} / ${workers[0]}`);
  }
}
