"""Fixtures shared by several test files, and the rule that keeps the fast tier in-process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist's workers (scripts/test.sh runs -n auto) share out the cores, one thread each on 2 cores, rather
# than each starting a thread per core; set before torch is imported, and inherited by the processes a test starts
# (tests/prefork.py's server among them). A value the caller exported is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

# The files whose tests take minutes (scripts/test.sh, 2 cores), collected first: pytest-xdist hands out whole
# files in collection order, and one of these handed out last kept a worker busy while the other stood idle.
HEAVY_FILES = ("test_reference_commands.py", "test_bench.py", "test_run_gpu.py")


def pytest_collection_modifyitems(items):
    """HEAVY_FILES first, in their order (a stable sort: every other test keeps its order)."""
    rank = {name: n for n, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))


# What a command line starts: this interpreter (a script, `-m module`), a shell (a recipe) or torchrun.
COMMANDS = {"bash", "sh", "torchrun"}
# Processes that torch starts for itself inside a test's own process (inductor's compile workers).
INTERNAL = ("torch._inductor",)


def _is_command_line(args) -> bool:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    if not argv:
        return False
    program = os.fsdecode(argv[0])
    name = Path(program.split()[0] if isinstance(args, str) else program).name
    is_python = program == sys.executable or name.startswith("python")
    internal = any(part in os.fsdecode(a) for a in argv for part in INTERNAL)
    return (is_python or name in COMMANDS) and not internal


@pytest.fixture(autouse=True)
def _in_process_unless_slow(request, monkeypatch):
    """`scripts/test.sh --fast` runs `-m "not slow"`: the tier that stays in the test process. A test that starts a
    command line (a subprocess, or a child of tests/prefork.py's server) without the slow marker fails here, naming
    the marker, so the fast tier cannot grow slow unnoticed. DataLoader workers and torch's own helpers are in-process
    machinery and stay allowed."""
    if request.node.get_closest_marker("slow"):
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if _is_command_line(args):
            shown = args if isinstance(args, str) else " ".join(map(os.fsdecode, args))[:120]
            pytest.fail(f"{request.node.nodeid} starts a process ({shown}): mark it @pytest.mark.slow, or run the job "
                        "in-process (tests/runs.py)", pytrace=False)
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    prefork = sys.modules.get("prefork")
    if prefork is not None:
        def refuse(*args, **kwargs):
            pytest.fail(f"{request.node.nodeid} runs a command line through tests/prefork.py: mark it "
                        "@pytest.mark.slow", pytrace=False)
        monkeypatch.setattr(prefork, "run", refuse)


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    """A tiny generated dataset: 3 classes, 8 training and 5 validation JPEGs each, 48 px. Read-only."""
    from image_classification.data.generated import generate_dataset
    return generate_dataset(tmp_path_factory.mktemp("generated"), num_classes=3, train_per_class=8, val_per_class=5,
                            image_size=48, seed=0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes of the generated dataset, 8 training and 2 validation images each, 48 px files. Read-only."""
    from image_classification.data.generated import generate_dataset
    return generate_dataset(tmp_path_factory.mktemp("tiny") / "data", num_classes=4, train_per_class=8,
                            val_per_class=2, image_size=48, seed=0)
