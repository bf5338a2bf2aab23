"""scripts/average_checkpoints.py: the mean of checkpoints, refusals naming the file, a workspace's last N, BN
statistics recomputed, and an output that every loader of the suite reads. CPU only, tiny sizes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prefork
from image_classification.arguments import parse_config
from image_classification.toolkit.averaging import main as average
from image_classification.deploy.classify import main as classify
from image_classification.models import get_entry

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def _bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))  # materialise the linear layer, move the BN statistics and counter
    return model


def _save(path: Path, state_dict: dict, epoch: int) -> Path:
    torch.save({"epoch": epoch, "best_prec1": 10.0 * epoch, "state_dict": state_dict, "optimizer": {}}, path)
    return path


def test_average_of_two_checkpoints_is_the_elementwise_mean(tmp_path, capsys):
    a, b = _bn_model(0).state_dict(), _bn_model(1).state_dict()
    b["1.num_batches_tracked"] = torch.tensor(7)
    assert average([str(_save(tmp_path / "a.pth.tar", a, 1)), str(_save(tmp_path / "b.pth.tar", b, 2)),
                    "--output", str(tmp_path / "avg.pth.tar")]) == 0
    assert "averaged 2 checkpoints (a.pth.tar, b.pth.tar)" in capsys.readouterr().out
    out = torch.load(tmp_path / "avg.pth.tar", weights_only=True)
    assert out["epoch"] == 2 and out["best_prec1"] == 20.0 and out["optimizer"] == {}
    assert out["state_dict"].keys() == a.keys()
    for key, tensor in a.items():
        if tensor.is_floating_point():
            assert torch.equal(out["state_dict"][key], (tensor + b[key]) / 2), key
            assert out["state_dict"][key].dtype == tensor.dtype
    assert out["state_dict"]["1.num_batches_tracked"] == 7  # integer buffers: the last checkpoint's
    assert not list(tmp_path.glob(".*.tmp"))


def test_mismatched_checkpoints_are_refused_naming_the_file(tmp_path, capsys):
    a = _bn_model(0).state_dict()
    wider = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(80, 2)).state_dict()
    fewer = {k: v for k, v in a.items() if not k.startswith("3.")}
    first = str(_save(tmp_path / "a.pth.tar", a, 1))
    for name, state_dict, problem in (("wider.pth.tar", wider, "shape of 0.weight is [5, 3, 3, 3], not [4, 3, 3, 3]"),
                                      ("fewer.pth.tar", fewer, "keys differ: missing 3.weight, 3.bias")):
        other = str(_save(tmp_path / name, state_dict, 2))
        with pytest.raises(SystemExit) as exit_info:
            average([first, other, "--output", str(tmp_path / "avg.pth.tar")])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err == f"average_checkpoints.py: error: {other} does not match {first}: {problem}"
    assert not (tmp_path / "avg.pth.tar").exists()


@pytest.fixture(scope="module")
def run(generated, tmp_path_factory) -> Path:
    """A 3-epoch b0 run at 32 px on the generated data that keeps its last 2 per-epoch checkpoints."""
    from image_classification.train import run
    workspace = tmp_path_factory.mktemp("run")
    run(parse_config([str(generated), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size",
                     str(SIZE), "-b", "8", "--num_classes", "3", "--workers", "0", "--epochs", "3", "--seed", "1",
                     "--lr", "0.01", "--gather-checkpoints", "2", "--workspace", str(workspace)]))
    return workspace


def test_workspace_last_n_with_recomputed_bn_loads_everywhere(run, generated, tmp_path, capsys):
    plain, recomputed = tmp_path / "plain.pth.tar", tmp_path / "bn.pth.tar"
    assert average(["--workspace", str(run), "--last", "2", "--output", str(plain)]) == 0
    assert average(["--workspace", str(run), "--last", "2", "--output", str(recomputed), "--recompute-bn", "2",
                    "--data", str(generated), "--workers", "0"]) == 0
    assert "BN statistics recomputed over 2 batches" in capsys.readouterr().out
    epochs = [torch.load(run / f"checkpoint_{e:04}.pth.tar", weights_only=True)["state_dict"] for e in (2, 3)]
    a, b = (torch.load(p, weights_only=True) for p in (plain, recomputed))
    assert a["averaged_from"] == [str(run / "checkpoint_0002.pth.tar"), str(run / "checkpoint_0003.pth.tar")]
    assert a["arch"] == "efficientnet-b0" and a["epoch"] == 3
    weight = "classifier.fc.weight"
    assert torch.equal(a["state_dict"][weight], (epochs[0][weight] + epochs[1][weight]) / 2)
    assert torch.equal(b["state_dict"][weight], a["state_dict"][weight])
    stats = [k for k in a["state_dict"] if k.endswith("running_mean")]
    assert stats and all(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in stats)

    # --pretrained-from-file, --evaluate --resume and classify.py read it.
    get_entry("efficientnet-b0")(num_classes=3, pretrained_from_file=str(recomputed))
    from image_classification.train import run
    summary = run(parse_config([str(generated), "--arch", "efficientnet-b0", "--data-backend", "pytorch",
                               "--image-size", str(SIZE), "-b", "8", "--num_classes", "3", "--workers", "0",
                               "--evaluate", "--resume", str(recomputed), "--workspace", str(tmp_path / "eval")]))
    assert 0.0 <= summary["val.top1"] <= 100.0
    capsys.readouterr()
    image = next((generated / "val").rglob("*.jpg"))
    assert classify(["--arch", "efficientnet-b0", "--num_classes", "3", "--pretrained-from-file", str(recomputed),
                     "--image", str(image), "--image-size", str(SIZE), "--cpu", "--precision", "FP32"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(image)


@pytest.mark.slow
def test_too_few_epoch_checkpoints_and_bad_flag_combinations(run, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "average_checkpoints.py")]
    out = str(tmp_path / "avg.pth.tar")
    for argv, status, message in (
            (["--workspace", str(run), "--last", "3"], 1, f"--workspace {run} has 2 per-epoch checkpoints"),
            (["--workspace", str(run)], 2, "--workspace needs --last N"),
            ([str(run / "checkpoint_0003.pth.tar")], 2, "give at least two CKPT files"),
            (["--workspace", str(run), "--last", "2", "--recompute-bn", "2"], 2, "--recompute-bn K and --data DIR"),
    ):
        result = prefork.run([*script, *argv, "--output", out], cwd=ROOT, timeout=120)
        assert result.returncode == status, result.stderr
        assert result.stderr.startswith("average_checkpoints.py: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not Path(out).exists()
