#!/usr/bin/env bash
# Install the suite with its test extras into .venv and run the test suite on CPU, printing the 25 slowest tests.
#   bash scripts/test.sh              everything (what CI runs)
#   bash scripts/test.sh --fast       the in-process tier only (-m "not slow": no test that starts a process)
# Other arguments go to pytest (e.g. -k resume, tests/test_data.py; -n 0 for one process, as a debugger needs).
# The tests run in one worker process per core (pytest-xdist), each test file on one worker, so that a file's
# fixtures are built once; tests/conftest.py gives each worker its share of the cores' threads.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" requirements-dev.txt
cd "$root"
tier=()
if [ "${1:-}" = "--fast" ]; then
    shift
    tier=(-m "not slow")
fi
exec .venv/bin/python -m pytest -q --durations=25 -n auto --dist loadfile "${tier[@]}" "$@"
