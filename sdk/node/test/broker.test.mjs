// The subject under the real broker: `procbroker run` with the subject (two
// workers), the built-in echo worker, and a client written with this SDK
// that calls them through the broker and reports each check. Then SIGTERM:
// the broker drains, stops every child and exits 0.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { SDK, SUBJECT, brokerBin, brokerEnv, sleep } from './helpers.mjs';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pb-node-broker-'));
const resultsFile = path.join(dir, 'results.json');
let broker;
let stderr = '';
let results = {};
let exit;

before(async () => {
  const bin = brokerBin();
  const config = path.join(dir, 'procbroker.toml');
  const q = (s) => JSON.stringify(s);
  fs.writeFileSync(config, `
[broker]
queue_capacity = 6000

[admin]
listen = ""

[sysmon]
interval_ms = 0

[[service]]
name = "subject"
command = ${q(process.execPath)}
args = [${q(SUBJECT)}]
workers = 2

[[service]]
name = "echo"
command = "@self"
args = ["worker", "echo"]

[[service]]
name = "client"
command = ${q(process.execPath)}
args = [${q(path.join(SDK, 'test', 'fixtures', 'broker-client.mjs'))}]
env = { RESULTS = ${q(resultsFile)} }
`);
  broker = spawn(bin, ['run', '--config', config], { stdio: ['ignore', 'ignore', 'pipe'], env: brokerEnv() });
  broker.stderr.setEncoding('utf8');
  broker.stderr.on('data', (s) => {
    stderr += s;
  });
  const exited = new Promise((resolve) => broker.on('exit', (code, signal) => resolve({ code, signal })));
  const started = performance.now();
  while (!fs.existsSync(resultsFile)) {
    if (broker.exitCode !== null) throw new Error(`the broker exited: ${stderr.slice(-3000)}`);
    if (performance.now() - started > 60_000) throw new Error(`no results within 60 s: ${stderr.slice(-3000)}`);
    await sleep(50);
  }
  results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'));
  broker.kill('SIGTERM');
  exit = await Promise.race([exited, sleep(20_000).then(() => null)]);
});

after(() => {
  if (broker && broker.exitCode === null && broker.signalCode === null) broker.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

function passed(name) {
  const result = results[name];
  assert.ok(result, `no result for ${name}: ${JSON.stringify(results)}`);
  assert.ok(result.ok, `${name}: ${result.detail}`);
  return result.detail;
}

for (const name of [
  'ping',
  'echo carries payloads byte for byte',
  '8 MiB through the broker',
  'errors keep their code and message',
  'each worker knows its id',
  'calls out through the broker (Relay)',
  'events both ways',
  'concurrent handlers: 8 Sleep 200 to one process within 0.6 s',
  '5000 calls in flight, one reply each',
  'a streaming method answers a plain call with its final reply',
  'lifecycle: the deadline reaches the handler',
  'lifecycle: partial replies stream through the broker',
  'lifecycle: an aborted call is cancelled at its worker',
  'lifecycle: a timeout cancels the handler',
  'lifecycle: a key pins calls to one worker',
]) {
  test(`under the broker: ${name}`, () => {
    passed(name);
  });
}

test('SIGTERM: the broker drains, stops the Node workers and exits 0', () => {
  assert.ok(exit, `the broker did not exit within 20 s of SIGTERM: ${stderr.slice(-3000)}`);
  assert.deepEqual(exit, { code: 0, signal: null }, stderr.slice(-3000));
  for (const { pid } of passed('each worker knows its id')) {
    assert.equal(fs.existsSync(`/proc/${pid}`), false, `subject pid ${pid} survived`);
  }
});
