"""multiproc.py: a 2-process gloo run (training, or --evaluate without DDP) equals the single-process run on the
same global batch.

The equivalence needs a model without BatchNorm (batch statistics differ per rank) and data whose
global batches do not depend on the number of processes, so the worker script below registers the
BN-free model of tests/tiny_model.py and a deterministic, index-sharded in-memory dataset; everything else (DDP, gradient
averaging, metric all-reduce, rank-0-only files, torchrun launch) is the real engine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reports import epoch_summaries, read_report
import prefork
from runs import free_port

ROOT = Path(__file__).resolve().parents[1]

WORKER = '''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import tiny_model
tiny_model.register()
import torch
from torch import nn


if "--evaluate" in sys.argv:  # evaluation needs no gradient all-reduce, so no DDP
    def refuse_ddp(*args, **kwargs):
        raise AssertionError("--evaluate wrapped the model in DistributedDataParallel")
    nn.parallel.DistributedDataParallel = refuse_ddp

from image_classification.data import Loader as BaseLoader

class Loader(BaseLoader):
    """Global permutation per epoch, interleaved shards (sample k goes to rank k % world), as DistributedSampler."""
    def __init__(self, n, batch_size, ctx, seed, train):
        super().__init__(classes=["a", "b", "c"], batch_size=batch_size, num_samples=n // ctx.world_size,
                         drop_last=True, ctx=ctx)
        g = torch.Generator().manual_seed(1234 if train else 4321)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x[torch.arange(n), self.y] += 1.0
        self.n, self.seed, self.train = n, seed, train
    def _iterate(self, epoch, skip_batches):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)) \\
            if self.train else torch.arange(self.n)
        mine = order[self.ctx.rank::self.ctx.world_size]
        for b in range(skip_batches, len(self)):
            index = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield (self.x[index], self.y[index]), 0

import image_classification.data as data
data.build_train_loader = lambda backend, d, *, batch_size, ctx, seed=None, **kw: Loader(64, batch_size, ctx, seed, True)
data.build_val_loader = lambda backend, d, *, batch_size, ctx, seed=None, **kw: Loader(32, batch_size, ctx, seed, False)

sys.argv[0] = "main.py"
import main
from image_classification.cli import exit_status
raise SystemExit(exit_status(main.main()))
'''


def _run(tmp_path: Path, name: str, nproc: int, batch: int, *extra: str) -> Path:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    workspace = tmp_path / name
    flags = ["--arch", "tiny-bn-free", "--data-backend", "synthetic", "-b", str(batch), "--epochs", "2",
             "--lr", "0.2", "--momentum", "0.9", "--wd", "1e-3", "--lr-schedule", "cosine", "--seed", "5",
             "--print-freq", "2", "--workspace", str(workspace), "--device", "cpu", "-j", "0", *extra]
    command = [sys.executable, "multiproc.py", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               str(worker), *flags]
    result = prefork.run(command, cwd=ROOT, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return workspace


def _epochs(workspace: Path) -> dict[int, dict]:
    records = read_report(workspace / "experiment_raport.json")
    # Rank 0 alone writes: the flags' and the model's parameter records once.
    assert sum(r["type"] == "LOG" and r["step"] == "PARAMETER" for r in records) == 2
    return epoch_summaries(records)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    single = _run(tmp_path, "single", nproc=1, batch=8)
    double = _run(tmp_path, "double", 2, 4, "--dist-backend", "gloo")
    a = torch.load(single / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(double / "checkpoint.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=1e-5, atol=1e-6)
    assert isinstance(b["rng"], list) and len(b["rng"]) == 2  # every rank's RNG state, for exact resume
    ea, eb = _epochs(single), _epochs(double)
    assert sorted(ea) == sorted(eb) == [0, 1]
    for epoch in ea:
        for key in ("train.loss", "val.loss", "val.top1", "val.top5"):
            assert ea[epoch][key] == pytest.approx(eb[epoch][key], rel=1e-5, abs=1e-6), (epoch, key)


@pytest.mark.slow
def test_evaluation_on_two_processes_equals_one_process_without_ddp(tmp_path):
    single = _epochs(_run(tmp_path, "single", 1, 8, "--evaluate"))
    double = _epochs(_run(tmp_path, "double", 2, 4, "--evaluate"))
    assert sorted(single) == sorted(double) == [0]
    for key in ("val.loss", "val.top1", "val.top5"):
        assert single[0][key] == pytest.approx(double[0][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_failing_worker_is_named_and_the_launcher_exits_non_zero(tmp_path):
    worker = tmp_path / "fail.py"
    worker.write_text("import sys\nsys.exit(3)\n")
    result = prefork.run([sys.executable, "multiproc.py", "--nproc_per_node", "1", "--master_port", str(free_port()),
                          str(worker)], cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert f"multiproc.py: {worker} failed on rank 0 (exit 3)" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pid", "group"])
def test_sigterm_saves_every_worker_and_the_launcher_exits_75(tmp_path, target):
    """SIGTERM to multiproc.py (its PID, or its process group as a scheduler sends it): the workers finish their
    step and save; the launcher passes on their 75 in one line, without torchrun's traceback."""
    import os
    import signal
    import time
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    workspace = tmp_path / "ws"
    command = [sys.executable, "multiproc.py", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(worker), "--arch", "tiny-bn-free", "--data-backend", "synthetic", "-b", "4", "--epochs", "1000",
               "--print-freq", "1", "--workspace", str(workspace), "--device", "cpu", "-j", "0", "--dist-backend",
               "gloo"]
    out = tmp_path / "stdout"
    with open(out, "w") as stdout:
        launcher = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 120
            while "Epoch: 1 " not in out.read_text() and time.monotonic() < deadline and launcher.poll() is None:
                time.sleep(0.2)
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            if target == "pid":
                os.kill(launcher.pid, signal.SIGTERM)
            else:
                os.killpg(launcher.pid, signal.SIGTERM)
            _, stderr = launcher.communicate(timeout=120)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"multiproc.py: {worker} stopped by a signal; continue with --resume"
    saved = torch.load(workspace / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] >= 1 and len(saved["rng"]) == 2
