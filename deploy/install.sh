#!/bin/sh
# Install outbox-relay into a new virtual environment: the one install step of deploy/Dockerfile's
# builder stage, and what tests/deploy/test_image.py runs outside Docker.
#
#   sh deploy/install.sh VENV SOURCE_DIR [EXTRAS]
#
# SOURCE_DIR holds pyproject.toml, README.md and outbox_relay/ (its SQL included). EXTRAS defaults to the
# runtime extras (OpenTelemetry and every broker client), never `dev`. PYTHON picks the
# interpreter that creates the venv (default: python3).
set -eu

if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    echo "usage: sh deploy/install.sh VENV SOURCE_DIR [EXTRAS]" >&2
    exit 2
fi
venv=$1
src=$2
extras=${3:-otel,nats,redis,mqtt,webhook}

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip
# A path install builds the wheel (the SQL is package data) and installs the wheel, not
# the source tree: the venv holds exactly what `pip install 'outbox-relay[...]'` would.
"$venv/bin/python" -m pip install "$src[$extras]"

# Smoke check: the console script runs and the package imports.
"$venv/bin/outbox-relay" --version
