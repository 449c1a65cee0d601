#!/usr/bin/env bash
# The Python SDK's tests: sets up what they need when it is missing, then
# runs them with pytest.
#
# - a virtual environment under target/sdk-venv (PYTHON, default python3,
#   3.9 or later) with pytest, msgpack, setuptools and wheel from PyPI;
# - the SDK itself, installed into it from sdk/python as a user would;
# - a procbroker binary for the tests that run under the real broker:
#   $PROCBROKER_BIN, else target/release or target/debug; when there is
#   none, a debug build is made here.
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
venv=target/sdk-venv
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import pytest, msgpack, setuptools, wheel" 2>/dev/null; then
    if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c "import ensurepip" 2>/dev/null; then
        # Debian's python3 needs python3-venv for `python3 -m venv`.
        SUDO=""
        if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "${pip[@]}" install "pytest>=7" "msgpack>=1.0" "setuptools>=61" wheel
fi
# The package as a user installs it (without build isolation: setuptools is
# already in the venv, so this needs no network).
"${pip[@]}" install --no-deps --no-build-isolation --force-reinstall ./sdk/python

if [ -z "${PROCBROKER_BIN:-}" ] && [ ! -x target/release/procbroker ] && [ ! -x target/debug/procbroker ]; then
    cargo build --locked --quiet --bin procbroker
fi

# Run from the tests' folder so that the checkout's copy of the package is
# not what gets imported.
cd sdk/python/tests
exec "../../../$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
