#!/usr/bin/env bash
# The Go SDK (sdk/go): installs what its tests need when missing (Go and
# Debian's MessagePack package, which it builds against offline), then
# checks its formatting, vets it and runs its tests (with the race
# detector). The tests that run the SDK under the broker use
# $PROCBROKER_BIN, else target/release/procbroker, else
# target/debug/procbroker, and fail without one.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"
debian_src=/usr/share/gocode/src

missing=()
command -v go >/dev/null || missing+=(golang-go)
[ -d "$debian_src/github.com/vmihailenco/msgpack/v5" ] || missing+=(golang-github-vmihailenco-msgpack.v5-dev)
# The race detector needs cgo.
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Offline: a workspace outside the SDK points its dependencies at Debian's
# packages (sdk/go/go.mod stays as a user elsewhere needs it). msgpack's
# go.mod names testify, which nothing compiles: a module with a go.mod
# alone stands in for it.
work="$repo/target/sdk-go"
mkdir -p "$work/stub/testify"
echo 'module github.com/stretchr/testify' >"$work/stub/testify/go.mod"
cat >"$work/go.work" <<WORK
go 1.19

use $repo/sdk/go

replace github.com/vmihailenco/msgpack/v5 => $debian_src/github.com/vmihailenco/msgpack/v5
replace github.com/vmihailenco/tagparser/v2 => $debian_src/github.com/vmihailenco/tagparser/v2
replace github.com/stretchr/testify => ./stub/testify
WORK
export GOWORK="$work/go.work" GOPROXY=off GOSUMDB=off GOFLAGS=

cd sdk/go
unformatted="$(gofmt -l .)"
if [ -n "$unformatted" ]; then
    echo "gofmt would change: $unformatted" >&2
    exit 1
fi
go vet ./...
go test -race -count=1 -timeout 5m ./...
