#!/usr/bin/env bash
# Create .venv and install outbox-relay with everything the demo and the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
