"""The training engine: report format, checkpoints, exact resume, atomic writes, signals, and the numerics
of accumulation, LR schedules, losses, mixup and EMA. CPU only, tiny sizes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from image_classification import checkpoint as ckpt
from image_classification.arguments import parse_args
from image_classification.context import create_context
from image_classification.ema import EMA, ema_decay
from image_classification.gpu_affinity import affinity_for, parse_cpulist
from image_classification.logger import Logger
from image_classification.losses import LabelSmoothing, SoftTargetCrossEntropy, build_loss
from image_classification.lr_schedule import lr_at
from image_classification.metrics import accuracy, percentile
from image_classification.mixup import mix
from image_classification.optimizers import build_optimizer, parameter_groups

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
TRAIN_KEYS = {"train.loss", "train.total_ips", "train.compute_ips", "train.data_time", "train.compute_time",
              "train.lr", "train.grad_scale"}
VAL_KEYS = {"val.loss", "val.top1", "val.top5", "val.total_ips", "val.compute_ips", "val.data_time",
            "val.compute_latency", "val.compute_latency_at100", "val.compute_latency_at99",
            "val.compute_latency_at95", "val.compute_latency_at90"}


def run_args(workspace: Path, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on the synthetic backend."""
    return ["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
            "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--prof", "3", "--workspace", str(workspace), *extra]


def needs_data_module():
    """End-to-end runs use the real data pipelines (synthetic backend)."""
    pytest.importorskip("image_classification.data", reason="image_classification.data has not landed yet")


def train(argv: list[str]) -> dict:
    from image_classification.training import main
    torch.use_deterministic_algorithms(True)
    try:
        return main(parse_args(argv))
    finally:
        torch.use_deterministic_algorithms(False)


def read_report(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        assert line.startswith("DLLL "), line
        record = json.loads(line[len("DLLL "):])
        assert {"timestamp", "datetime", "elapsedtime", "type", "step", "data"} <= set(record)
        assert record["type"] in ("LOG", "METADATA")
        records.append(record)
    return records


def epoch_records(records: list[dict]) -> dict[int, dict]:
    return {r["step"][0]: r["data"] for r in records if r["type"] == "LOG" and isinstance(r["step"], list)
            and len(r["step"]) == 1}


# --- end-to-end runs ------------------------------------------------------------------------------------------

def test_short_run_writes_report_and_checkpoints(tmp_path):
    needs_data_module()
    summary = train(run_args(tmp_path, "--use-ema", "0.9", "--gather-checkpoints", "1", "--label-smoothing",
                             "0.1", "--mixup", "0.2"))
    records = read_report(tmp_path / "experiment_raport.json")
    params = [r for r in records if r["step"] == "PARAMETER" and r["type"] == "LOG"]
    assert params and params[0]["data"]["arch"] == "efficientnet-b0" and params[0]["data"]["model.num_classes"] == 4
    metadata = {r["metric"] for r in records if r["type"] == "METADATA"}
    assert TRAIN_KEYS | VAL_KEYS <= metadata
    iterations = [r for r in records if r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 2]
    assert iterations and TRAIN_KEYS <= set(iterations[0]["data"])
    epochs = epoch_records(records)
    assert sorted(epochs) == [0, 1]
    for data in epochs.values():
        assert TRAIN_KEYS | VAL_KEYS | {k.replace("val.", "val_ema.") for k in VAL_KEYS} <= set(data)
    assert epochs[0]["train.lr"] == pytest.approx(0.01)  # warmup 1 epoch: lr·1/1
    final = [r for r in records if r["step"] == []]
    assert len(final) == 1 and final[0]["data"]["val.top1"] == pytest.approx(summary["val.top1"])

    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "checkpoint_0002.pth.tar", "classes.txt"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "checkpoint_0001.pth.tar").exists()  # --gather-checkpoints 1 keeps the last one
    assert (tmp_path / "classes.txt").read_text().split() == ["0", "1", "2", "3"] or \
        len((tmp_path / "classes.txt").read_text().split()) == 4
    saved = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "best_prec1", "state_dict", "optimizer", "state_dict_ema", "scaler", "rng", "iteration",
            "data_seed", "arch", "args"} <= set(saved)
    assert saved["epoch"] == 2 and saved["iteration"] == 0
    assert not any(k.startswith("module.") for k in saved["state_dict"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_after_one_epoch_equals_uninterrupted_run(tmp_path):
    needs_data_module()
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(full, "--use-ema", "0.9", "--mixup", "0.2"))
    train(run_args(split, "--use-ema", "0.9", "--mixup", "0.2", "--run-epochs", "1"))
    assert torch.load(split / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
    train(run_args(split, "--use-ema", "0.9", "--mixup", "0.2", "--resume", str(split / "checkpoint.pth.tar")))

    a = torch.load(full / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["best_prec1"] == b["best_prec1"]
    ra, rb = epoch_records(read_report(full / "experiment_raport.json")), \
        epoch_records(read_report(split / "experiment_raport.json"))
    for epoch in (0, 1):
        for key in ("train.loss", "train.lr", "val.loss", "val.top1", "val.top5", "val_ema.loss"):
            assert ra[epoch][key] == rb[epoch][key], (epoch, key)


def test_resume_refuses_missing_corrupt_and_finished_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        train(run_args(tmp_path, "--resume", str(tmp_path / "missing.pth.tar")))
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ckpt.CheckpointError, match="not a readable"):
        train(run_args(tmp_path, "--resume", str(corrupt)))
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    with pytest.raises(ckpt.CheckpointError, match="not a training checkpoint"):
        train(run_args(tmp_path, "--resume", str(weights)))
    finished = tmp_path / "finished.pth.tar"
    torch.save({"epoch": 2, "best_prec1": 0.0, "state_dict": {}, "optimizer": {}}, finished)
    with pytest.raises(ckpt.CheckpointError, match="already run 2 epochs"):
        train(run_args(tmp_path, "--resume", str(finished)))


def test_main_py_prints_one_line_errors(tmp_path):
    result = subprocess.run([sys.executable, "main.py", *run_args(tmp_path, "--resume", str(tmp_path / "nope"))],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"main.py: error: --resume {tmp_path / 'nope'}: no such file"]
    result = subprocess.run([sys.executable, "main.py", *run_args(tmp_path, "--optimizer-batch-size", "6")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "multiple of world size x batch size" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_mid_epoch_saves_and_exits_cleanly(tmp_path):
    needs_data_module()
    argv = [sys.executable, "main.py", *run_args(tmp_path, "--prof", "40", "--epochs", "1", "--print-freq", "1")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report = tmp_path / "experiment_raport.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first logged iteration
        if report.is_file() and '"step": [0, 1]' in report.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 0 and 1 <= saved["iteration"] < 40
    assert "stopped by signal" in out
    # --resume finishes the interrupted epoch from the next batch.
    summary = train(run_args(tmp_path, "--prof", "40", "--epochs", "1", "--resume", str(tmp_path / "checkpoint.pth.tar")))
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 1 and saved["iteration"] == 0 and summary["epoch"] == 1


# --- atomic writes --------------------------------------------------------------------------------------------

def test_killed_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    ckpt.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is killed in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


def test_killed_process_mid_write_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    ckpt.atomic_save({"epoch": 1}, path)
    # A child starts a large atomic write and is SIGKILLed before the rename.
    code = ("import sys, torch, os, signal\n"
            "from image_classification import checkpoint as c\n"
            "real = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    real(obj, f, *a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
            "torch.save = save\n"
            f"c.atomic_save({{'epoch': 2, 'w': torch.zeros(1000)}}, {str(path)!r})\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_rng_state_round_trip_is_weights_only():
    torch.manual_seed(0), np.random.seed(0)
    import random
    random.seed(0)
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    buffer = __import__("io").BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    ckpt.restore_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


# --- numerics -------------------------------------------------------------------------------------------------

def _bn_free_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_gradient_accumulation_of_two_batches_equals_one_double_batch():
    from image_classification.training import Engine, train_step
    ctx = create_context(device="cpu")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    models = []
    for accumulation, batches in ((2, [(x[:4], y[:4]), (x[4:], y[4:])]), (1, [(x, y)])):
        model = _bn_free_model()
        optimizer = build_optimizer(model, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
        engine = Engine(ctx=ctx, model=model, train_model=model, criterion=LabelSmoothing(0.1),
                        optimizer=optimizer, scaler=ctx.grad_scaler(), accumulation=accumulation)
        engine.criterion.train()
        for _ in range(2):  # two optimizer steps, so momentum is exercised too
            for i, (images, target) in enumerate(batches):
                train_step(engine, images, target, optimizer_step=(i + 1) % accumulation == 0)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_must_divide():
    from image_classification.training import accumulation_steps
    assert accumulation_steps(-1, 256, 8) == 1
    assert accumulation_steps(4096, 256, 8) == 2
    with pytest.raises(ValueError, match="multiple of world size x batch size = 8 x 256 = 2048"):
        accumulation_steps(3000, 256, 8)


@pytest.mark.parametrize("schedule,expected", [
    ("step", [0.1] * 30 + [0.01] * 30 + [0.001] * 20 + [0.0001] * 10),
    ("linear", [0.1 * (1 - e / 90) for e in range(90)]),
    ("cosine", [0.5 * (1 + math.cos(math.pi * e / 90)) * 0.1 for e in range(90)]),
    ("exponential", [0.1 * 0.97 ** e for e in range(90)]),
])
def test_lr_schedules_per_epoch(schedule, expected):
    got = [lr_at(e, schedule=schedule, base_lr=0.1, epochs=90) for e in range(90)]
    assert got == pytest.approx(expected)


def test_lr_warmup_and_cosine_end_lr():
    lrs = [lr_at(e, schedule="cosine", base_lr=0.08, epochs=10, warmup=4, end_lr=0.001) for e in range(10)]
    assert lrs[:4] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert lrs[4] == pytest.approx(0.08)
    assert lrs[7] == pytest.approx(0.001 + 0.5 * (1 + math.cos(math.pi * 3 / 6)) * 0.079)
    assert lr_at(4, schedule="linear", base_lr=0.1, epochs=10, warmup=2) == pytest.approx(0.1 * (1 - 2 / 8))


def test_label_smoothing_and_mixup_soft_target_loss_on_known_tensors():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    target = torch.tensor([0, 2])
    logp = F.log_softmax(logits, dim=1)
    s = 0.1
    smooth = LabelSmoothing(s).train()
    expected = ((1 - s) * -logp[[0, 1], [0, 2]] + s * -logp.mean(1)).mean()
    torch.testing.assert_close(smooth(logits, target), expected)

    lam, perm = 0.7, torch.tensor([1, 0])
    images = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mixed, soft = mix(images, F.one_hot(target, 3).float(), lam, perm)
    torch.testing.assert_close(mixed, torch.tensor([[1.6, 2.6], [2.4, 3.4]]))
    torch.testing.assert_close(soft, torch.tensor([[0.7, 0.0, 0.3], [0.3, 0.0, 0.7]]))
    loss = SoftTargetCrossEntropy(s).train()
    expected = ((1 - s) * -(logp * soft).sum(1) + s * -logp.mean(1)).mean()
    torch.testing.assert_close(loss(logits, soft), expected)
    # In eval every loss is plain cross-entropy on labels.
    for criterion in (loss, smooth, build_loss(0.0, 0.0)):
        torch.testing.assert_close(criterion.eval()(logits, target), F.cross_entropy(logits, target))
    assert isinstance(build_loss(0.1, 0.2), SoftTargetCrossEntropy)


def test_ema_update_formula_skips_num_batches_tracked():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, 0.999)
    shadow0 = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, step=3)
    mu = ema_decay(0.999, 3)
    assert mu == pytest.approx(4 / 13)
    for name, value in ema.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == 0
        else:
            torch.testing.assert_close(value, mu * shadow0[name] + (1 - mu) * model.state_dict()[name])
    assert ema_decay(0.999, 10**6) == 0.999


def test_bn_parameters_get_no_weight_decay():
    from image_classification.models import get_entry
    model = get_entry("efficientnet-b0")(num_classes=4)
    groups = parameter_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.0 and all("bn" in names[id(p)] for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 1e-5 and not any("bn" in names[id(p)] for p in groups[1]["params"])
    assert len(parameter_groups(model, 1e-5, bn_weight_decay=True)) == 1
    opt = build_optimizer(model, optimizer="rmsprop", lr=0.1, momentum=0.9, weight_decay=1e-5, rmsprop_alpha=0.8,
                          rmsprop_eps=0.01)
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["alpha"] == 0.8 and opt.defaults["eps"] == 0.01


def test_topk_accuracy_and_percentiles():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 1])
    assert accuracy(logits, target, (1, 2)) == pytest.approx([100 / 3, 200 / 3])
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 100) == 100 and percentile(values, 90) == pytest.approx(90.1)
    assert math.isnan(percentile([], 95))


def test_logger_writes_dllogger_lines(tmp_path):
    path = tmp_path / "r.json"
    logger = Logger(path, print_stdout=False)
    logger.log("PARAMETER", {"lr": 0.1})
    logger.metadata("train.loss", {"unit": None})
    logger.log((0, 1), {"train.loss": torch.tensor(2.5)})
    logger.log((0, 1, 2), {"val.top1": float("nan")})
    # Flushed as it goes: readable before close.
    records = read_report(path)
    assert [r["step"] for r in records] == ["PARAMETER", "PARAMETER", [0, 1], [0, 1, 2]]
    assert records[2]["data"] == {"train.loss": 2.5}
    assert records[1]["metric"] == "train.loss"
    logger.close()
    silent = Logger(tmp_path / "other.json", enabled=False)
    silent.log((), {"x": 1})
    assert not (tmp_path / "other.json").exists()


def test_gpu_affinity_modes_and_cpu_refusal():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    sockets = [list(range(0, 8))] * 2 + [list(range(8, 16))] * 2
    assert affinity_for("socket", 1, sockets) == list(range(8))
    assert len(affinity_for("single", 2, sockets)) >= 1
    a, b = affinity_for("socket_unique_contiguous", 0, sockets), affinity_for("socket_unique_contiguous", 1, sockets)
    assert a and b and not set(a) & set(b) and set(a) | set(b) <= set(range(8))
    c, d = affinity_for("single_unique", 2, sockets), affinity_for("single_unique", 3, sockets)
    assert not set(c) & set(d)
    from image_classification.gpu_affinity import set_affinity
    with pytest.raises(ValueError, match="--gpu-affinity socket"):
        set_affinity("socket", create_context(device="cpu"))


def test_plot_report_writes_png(tmp_path):
    report = tmp_path / "raport.json"
    logger = Logger(report, print_stdout=False)
    for epoch in range(3):
        logger.log((epoch,), {"train.loss": 2.0 - epoch * 0.5, "val.loss": 2.1 - epoch * 0.4,
                              "val.top1": 30.0 + 10 * epoch, "val.top5": 80.0 + epoch})
    logger.close()
    result = subprocess.run([sys.executable, "scripts/plot_report.py", str(report)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "raport.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
