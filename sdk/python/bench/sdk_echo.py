#!/usr/bin/env python3
"""An Echo service written with the SDK, its handler of the kind named on
the command line, to measure what each kind costs (echo_bench.py):

  inline  a raw inline handler (what the conformance subject's Echo is)
  plain   `def echo(payload): return payload` (decoded, on the thread pool)
  async   `async def echo(payload): return payload` (on the event loop)
"""
import os
import sys

try:
    from procbroker import Service
except ImportError:  # run from a checkout without `pip install ./sdk/python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from procbroker import Service

svc = Service()
kind = sys.argv[1] if len(sys.argv) > 1 else "plain"

if kind == "inline":
    @svc.method("Echo", raw=True, inline=True)
    def echo(payload):
        return payload
elif kind == "plain":
    @svc.method("Echo")
    def echo(payload):
        return payload
elif kind == "async":
    @svc.method("Echo")
    async def echo(payload):
        return payload
else:
    raise SystemExit(f"unknown kind {kind!r}: inline, plain or async")

svc.run()
