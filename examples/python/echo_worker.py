#!/usr/bin/env python3
"""A procbroker worker in Python, written with the Python SDK (sdk/python).

Serves two methods:
  Echo     -> replies with the request's payload
  Reverse  -> replies with the payload string reversed (bad_request if not a str)
Any other method gets an error reply with code "unknown_method".

The SDK does the rest: the `ready` handshake, `Ping`, `shutdown` (from the
broker only), EOF, deadlines and `cancel`; it logs to stderr (stdout
carries frames).

Needs the SDK: pip install ./sdk/python (from a checkout it also runs as
is: the copy in sdk/python is used when none is installed). PROTOCOL.md
shows the same worker written against the wire alone, with `msgpack`.
"""
import logging
import os
import sys

try:
    from procbroker import CallError, Service
except ImportError:  # run from a checkout without the SDK installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sdk", "python"))
    from procbroker import CallError, Service

logging.basicConfig(level=logging.INFO, format="%(message)s")

svc = Service()


@svc.method("Echo")
def echo(payload):
    return payload


@svc.method("Reverse")
def reverse(payload):
    if not isinstance(payload, str):
        raise CallError("bad_request", "Reverse takes a string")
    return payload[::-1]


if __name__ == "__main__":
    svc.run()
