#!/usr/bin/env bash
# The demo command: services up, dependencies installed, then the order-service demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/bootstrap.sh
exec .venv/bin/python examples/demo.py
