// The conformance kit of the broker binary against this SDK's subject:
// `procbroker conformance -- node conformance/subject.mjs` must pass every
// check (exit status 0).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test } from 'node:test';

import { SUBJECT, brokerBin, brokerEnv } from './helpers.mjs';

test('procbroker conformance passes the Node subject', { timeout: 180_000 }, async () => {
  const bin = brokerBin();
  const kit = spawn(bin, ['conformance', '--', process.execPath, SUBJECT], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: brokerEnv(),
  });
  let out = '';
  kit.stdout.setEncoding('utf8');
  kit.stderr.setEncoding('utf8');
  kit.stdout.on('data', (s) => {
    out += s;
  });
  kit.stderr.on('data', (s) => {
    out += s;
  });
  const code = await new Promise((resolve) => kit.on('exit', (c, signal) => resolve(c ?? signal)));
  const failed = out.split('\n').filter((line) => line.startsWith('FAIL'));
  assert.equal(code, 0, `procbroker conformance exited ${code}:\n${failed.join('\n') || out.slice(-4000)}`);
  assert.match(out, /conformance: (\d+)\/\1 checks passed/);
});
