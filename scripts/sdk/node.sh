#!/usr/bin/env bash
# The Node SDK's tests (sdk/node): installs Node and npm when missing or
# too old (Debian's packages), the SDK's one dependency from the npm
# registry (npm ci, from the lock file), then runs `node --test`.
#
# The tests that run the subject under the real broker use $PROCBROKER_BIN,
# else target/release/procbroker, else target/debug/procbroker of this
# checkout, and fail when there is none: build one first.
set -euo pipefail
cd "$(dirname "$0")/../.."

node_major() {
    node -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0
}
if ! command -v npm >/dev/null || [ "$(node_major)" -lt 18 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nodejs npm >/dev/null
fi
if [ "$(node_major)" -lt 18 ]; then
    echo "sdk/node needs Node >= 18, found $(node --version 2>/dev/null || echo none)" >&2
    exit 1
fi

cd sdk/node
# The lock file pins @msgpack/msgpack; skip the download when it is there.
if [ ! -f node_modules/@msgpack/msgpack/package.json ] ||
    ! node -e 'const l=require("./package-lock.json"),p=require("./node_modules/@msgpack/msgpack/package.json");process.exit(l.packages["node_modules/@msgpack/msgpack"].version===p.version?0:1)'; then
    npm ci --no-audit --no-fund --loglevel=error
fi
exec node --test test/*.test.mjs
