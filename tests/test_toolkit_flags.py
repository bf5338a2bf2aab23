"""The fine-tuning and accuracy flags together, as a user combines them: on the pytorch and dali-cpu backends, in
one process and in two gloo processes (multiproc.py), each run a real main.py job on generated images."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from image_classification.models import get_entry
from reports import by_step, epoch_summaries, read_report
import prefork
from runs import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    """(pretrained weights for 5 classes, to fine-tune with --reset-classifier; a 3-class teacher)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    pretrained, teacher = folder / "pretrained.pth", folder / "teacher.pth"
    torch.save(get_entry("efficientnet-b0")(num_classes=5).state_dict(), pretrained)
    torch.save(get_entry("efficientnet-b0")(num_classes=3).state_dict(), teacher)
    return pretrained, teacher


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
@pytest.mark.slow
def test_finetune_distil_swa_and_tta_flags_run_together(generated, weights, tmp_path, backend, nproc):
    if backend == "dali-cpu":
        pytest.importorskip("nvidia.dali")
    pretrained, teacher = weights
    workspace = tmp_path / "ws"
    flags = [str(generated), "--arch", "efficientnet-b0", "--num_classes", "3", "--data-backend", backend,
             "--image-size", "32", "-b", str(4 // nproc), "--epochs", "2", "--optimizer", "sgd", "--lr", "0.01",
             "--momentum", "0.9", "--seed", "0", "--device", "cpu", "-j", "1", "--print-freq", "100",
             "--workspace", str(workspace),
             "--pretrained-from-file", str(pretrained), "--reset-classifier", "--head-init", "zero",
             "--layer-decay", "0.8", "--head-lr-scale", "2", "--freeze-until", "1",
             "--teacher-arch", "efficientnet-b0", "--teacher-weights", str(teacher), "--kd-alpha", "0.5",
             "--kd-temperature", "2",
             "--swa-start", "1", "--swa-lr", "0.005", "--swa-anneal-epochs", "0", "--tta", "flip"]
    if nproc == 1:
        command = [sys.executable, "main.py", *flags]
    else:
        command = [sys.executable, "multiproc.py", "--nproc_per_node", str(nproc), "--master_port",
                   str(free_port()), "main.py", *flags, "--dist-backend", "gloo"]
    result = prefork.run(command, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    records = read_report(workspace / "experiment_raport.json")
    epochs = epoch_summaries(records)
    assert sorted(epochs) == [0, 1]
    assert all(e["train.kd_loss"] > 0 and e["val.top1"] is not None for e in epochs.values())
    assert by_step(records)[()]["swa.top1"] is not None and (workspace / "model_swa.pth.tar").is_file()

    loaded = torch.load(pretrained, weights_only=True)
    trained = torch.load(workspace / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    frozen = [k for k in loaded if k.startswith(("stem.", "layers.0.", "layers.1."))]
    assert frozen and all(torch.equal(trained[k], loaded[k]) for k in frozen)  # weights and BN statistics
    assert not torch.equal(trained["features.conv.weight"], loaded["features.conv.weight"])  # past the frozen part
