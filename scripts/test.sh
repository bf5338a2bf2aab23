#!/usr/bin/env bash
# Install the suite with its test extras into .venv and run the whole test suite on CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" requirements-dev.txt
cd "$root"
exec .venv/bin/python -m pytest -q tests "$@"
