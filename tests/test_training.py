"""The training engine: report format, checkpoints, exact resume, atomic writes, signals, and the numerics
of accumulation, LR schedules, losses, mixup and EMA. CPU only, tiny sizes."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
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
from image_classification.cli import EXIT_INTERRUPTED
from image_classification.context import create_context
from image_classification.train.ema import EMA, ema_decay
from image_classification.gpu_affinity import affinity_for, parse_cpulist
from image_classification.logger import Logger
from image_classification.train.losses import LabelSmoothing, SoftTargetCrossEntropy, build_loss
from image_classification.train.schedules import lr_at
from image_classification.metrics import accuracy, percentile
from image_classification.data.mixup import mix
from image_classification.train.optimizers import build_optimizer, parameter_groups
from reports import by_step, epoch_summaries, read_report
from runs import train

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
TRAIN_KEYS = {"train.loss", "train.total_ips", "train.compute_ips", "train.data_time", "train.compute_time",
              "train.lr", "train.grad_scale"}
VAL_KEYS = {"val.loss", "val.top1", "val.top5", "val.total_ips", "val.compute_ips", "val.data_time",
            "val.compute_latency", "val.compute_latency_at100", "val.compute_latency_at99",
            "val.compute_latency_at95", "val.compute_latency_at90", "val.first_batch_latency"}


def run_args(workspace: Path, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on the synthetic backend."""
    return ["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
            "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--prof", "3", "--workspace", str(workspace), *extra]


def needs_data_module():
    """End-to-end runs use the real data pipelines (synthetic backend)."""
    pytest.importorskip("image_classification.data", reason="image_classification.data has not landed yet")


# --- end-to-end runs ------------------------------------------------------------------------------------------

def test_short_run_writes_report_and_checkpoints(tmp_path):
    needs_data_module()
    summary = train(run_args(tmp_path, "--use-ema", "0.9", "--gather-checkpoints", "1", "--label-smoothing",
                             "0.1", "--mixup", "0.2"))
    records = read_report(tmp_path / "experiment_raport.json")
    params = [r for r in records if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    assert params[0]["data"]["arch"] == "efficientnet-b0" and params[1]["data"]["model.num_classes"] == 4
    metadata = {r["metric"] for r in records if r["type"] == "METADATA"}
    assert TRAIN_KEYS | VAL_KEYS <= metadata
    iterations = [data for step, data in by_step(records).items() if len(step) == 2]
    assert iterations and TRAIN_KEYS <= set(iterations[0])
    epochs = epoch_summaries(records)
    assert sorted(epochs) == [0, 1]
    for data in epochs.values():
        assert TRAIN_KEYS | VAL_KEYS | {k.replace("val.", "val_ema.") for k in VAL_KEYS} <= set(data)
    assert epochs[0]["train.lr"] == pytest.approx(0.01)  # warmup 1 epoch: lr·1/1
    final = [r for r in records if r["type"] == "LOG" and r["step"] == []]
    assert len(final) == 2 and by_step(records)[()]["val.top1"] == pytest.approx(summary["val.top1"])

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


# This suite's metrics beyond the reference's (README, Differences from the reference).
OUR_METRICS = ("image_size", "bad_files", "compute_latency_at90", "first_batch_latency", "per_class_top1",
               "confusion_matrix")


def _reference_shape(records: list[dict]) -> list[tuple]:
    """Each record as what the reference's format fixes: its keys in order, type, step, and the metric names in
    order (the metrics this suite adds left out); values are the run's own."""
    shape = []
    for record in records:
        if record["type"] == "METADATA":
            if not record["metric"].endswith(OUR_METRICS):
                shape.append((tuple(record), record["metric"], json.dumps(record["metadata"])))
        elif record["step"] != "PARAMETER":
            names = tuple(name for name in record["data"] if not name.endswith(OUR_METRICS))
            if names:
                shape.append((tuple(record), record["step"], names))
    return shape


def test_report_matches_the_references_record_for_record(tmp_path):
    """tests/fixtures/reference_report.json is what the reference's DLLogger writes for this run (main.py with the
    same flags, synthetic data): record order, verbosity split, keys and metadata must be the same."""
    needs_data_module()
    train(["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
           "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--prof", "3",
           "--workspace", str(tmp_path)])
    ours = read_report(tmp_path / "experiment_raport.json")
    reference = read_report(ROOT / "tests" / "fixtures" / "reference_report.json")
    assert _reference_shape(ours) == _reference_shape(reference)
    parameters = [r for r in ours if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    expected = [r for r in reference if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    assert len(parameters) == len(expected) == 2
    for mine, theirs in zip(parameters, expected):
        assert set(theirs["data"]) <= set(mine["data"])  # plus this suite's flags
    assert all(r["datetime"].endswith("+00:00") for r in ours)
    # Epoch and run summaries hold every registered metric: null where the run has none (--training-only).
    only = tmp_path / "training_only"
    train(run_args(only, "--training-only"))
    summary = by_step(read_report(only / "experiment_raport.json"))[()]
    assert summary["val.top1"] is None and isinstance(summary["train.loss"], float)


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
    ra, rb = epoch_summaries(read_report(full / "experiment_raport.json")), \
        epoch_summaries(read_report(split / "experiment_raport.json"))
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
    assert proc.returncode == EXIT_INTERRUPTED, err  # not 0: a retry loop must tell it from a finished run
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
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is killed in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


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
    from image_classification.train.epoch import train_step
    from image_classification.train.losses import TrainingLoss
    from image_classification.train.state import Trainer
    ctx = create_context(device="cpu")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    models = []
    for accumulation, batches in ((2, [(x[:4], y[:4]), (x[4:], y[4:])]), (1, [(x, y)])):
        model = _bn_free_model()
        optimizer = build_optimizer(model, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
        engine = Trainer(ctx=ctx, model=model, train_model=model, loss=TrainingLoss(LabelSmoothing(0.1)),
                         optimizer=optimizer, scaler=ctx.grad_scaler(), accumulation=accumulation)
        engine.loss.criterion.train()
        for _ in range(2):  # two optimizer steps, so momentum is exercised too
            for i, (images, target) in enumerate(batches):
                train_step(engine, images, target, optimizer_step=(i + 1) % accumulation == 0)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_must_divide():
    from image_classification.train.setup import accumulation_steps
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
    smoothed = ((1 - s) * -logp[[0, 1], [0, 2]] + s * -logp.mean(1)).mean()
    torch.testing.assert_close(smooth(logits, target), smoothed)

    lam, perm = 0.7, torch.tensor([1, 0])
    images = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mixed, soft = mix(images, F.one_hot(target, 3).float(), lam, perm)
    torch.testing.assert_close(mixed, torch.tensor([[1.6, 2.6], [2.4, 3.4]]))
    torch.testing.assert_close(soft, torch.tensor([[0.7, 0.0, 0.3], [0.3, 0.0, 0.7]]))
    loss = SoftTargetCrossEntropy(s).train()
    expected = ((1 - s) * -(logp * soft).sum(1) + s * -logp.mean(1)).mean()
    torch.testing.assert_close(loss(logits, soft), expected)
    # In eval, as the reference validates: the mixup loss and plain cross-entropy are cross-entropy on labels,
    # label smoothing stays.
    for criterion in (loss, build_loss(0.0, 0.0)):
        torch.testing.assert_close(criterion.eval()(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(smooth.eval()(logits, target), smoothed)
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


def test_ema_moves_every_iteration_counted_over_the_run_also_between_accumulated_steps(tmp_path, monkeypatch):
    """The reference's cadence: ema(model, epoch * steps_per_epoch + i) after every iteration."""
    needs_data_module()
    from image_classification.data.synthetic import TRAIN_BATCHES
    steps = []
    update = EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, model, step: (steps.append(step), update(self, model, step)))
    train(run_args(tmp_path, "--use-ema", "0.9", "--optimizer-batch-size", "8", "--no-checkpoints"))
    assert steps == [0, 1, 2, TRAIN_BATCHES, TRAIN_BATCHES + 1, TRAIN_BATCHES + 2]  # --prof 3 of each epoch


def test_validation_reports_the_warm_up_batch_apart(monkeypatch):
    """Latencies and compute speed are the steady batches'; the first (cuDNN search, compilation) has its own."""
    from image_classification.data.synthetic import SyntheticLoader
    from image_classification.train import validate as validation
    clock = [0.0]
    monkeypatch.setattr(validation.time, "perf_counter", lambda: clock[0])

    class Timed(nn.Module):  # the first forward costs 10 s of the fake clock, each later one 1 s
        def __init__(self):
            super().__init__()
            self.calls, self.fc = 0, nn.Linear(3, 4)

        def forward(self, x):
            self.calls += 1
            clock[0] += 10.0 if self.calls == 1 else 1.0
            return self.fc(x.mean((2, 3)))

    ctx = create_context(device="cpu")
    loader = SyntheticLoader(image_size=8, batch_size=2, ctx=ctx, num_classes=4, batches_per_epoch=5)
    options = validation.EvalOptions(prof=-1, topk=5, print_freq=10, tta="none")
    result = validation.validate(Timed(), loader, ctx, Logger(None, enabled=False), options)
    assert result["val.first_batch_latency"] == 10.0
    assert result["val.compute_latency"] == result["val.compute_latency_at100"] == 1.0
    assert result["val.compute_ips"] == 2.0  # 8 images of the 4 steady batches in 4 s
    assert result["val.total_ips"] == 10 / 14.0


def test_bn_parameters_get_no_weight_decay():
    from image_classification.models import get_entry
    model = get_entry("efficientnet-b0")(num_classes=4)
    groups = parameter_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.0 and all("bn" in names[id(p)] for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 1e-5 and not any("bn" in names[id(p)] for p in groups[1]["params"])
    # --bn-weight-decay: the reference's SGD takes one group, its RMSprop keeps both groups, both decayed.
    assert len(parameter_groups(model, 1e-5, bn_weight_decay=True)) == 1
    both = build_optimizer(model, optimizer="rmsprop", lr=0.1, momentum=0.9, weight_decay=1e-5, bn_weight_decay=True)
    assert [len(g["params"]) for g in both.param_groups] == [len(g["params"]) for g in groups]
    assert [g["weight_decay"] for g in both.param_groups] == [1e-5, 1e-5]
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
    assert [r.get("step", r["type"]) for r in records] == ["PARAMETER", "METADATA", [0, 1], [0, 1, 2]]
    assert records[2]["data"] == {"train.loss": 2.5}
    assert records[1]["metric"] == "train.loss" and records[1]["metadata"] == {"unit": None}
    logger.close()
    silent = Logger(tmp_path / "other.json", enabled=False)
    silent.log((), {"x": 1})
    assert not (tmp_path / "other.json").exists()


def test_report_reader_merges_a_steps_records_and_names_a_bad_line(tmp_path):
    from image_classification.logger import ReportError, by_step, epoch_summaries
    from image_classification.logger import read_report as read_records
    path = tmp_path / "r.json"
    logger = Logger(path, print_stdout=False)
    logger.register_metrics("val", {"top1": 0, "loss": 1})
    logger.log((1,), {"val.top1": 50.0, "val.loss": 1.5})
    logger.log((0,), {"val.top1": 40.0})  # the summary lists val.loss as null
    logger.log((0,), {"val.loss": 2.0})   # logged again (a resumed run): its values win, its nulls do not
    logger.log((), {"val.top1": 50.0})
    logger.close()
    records = read_records(path)
    assert records == read_report(path)  # the tests' strict reader sees the same records
    assert epoch_summaries(records) == {0: {"val.top1": 40.0, "val.loss": 2.0}, 1: {"val.top1": 50.0, "val.loss": 1.5}}
    assert list(epoch_summaries(records)) == [0, 1] and by_step(records)[()]["val.top1"] == 50.0
    path.write_text(path.read_text() + "DLLL {not json\n")
    with pytest.raises(ReportError, match=f"{path}:{len(records) + 1}: not a JSON record"):
        read_records(path)


def test_dist_backend_is_nccl_on_gpus_gloo_on_cpus_and_gloo_lets_ranks_share_a_gpu(monkeypatch):
    from image_classification.cli import UserError
    from image_classification.context import dist_backend_for
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dist_backend_for("auto", gpu) == "nccl" and dist_backend_for("auto", cpu) == "gloo"
    assert dist_backend_for("gloo", gpu, ranks_per_gpu=2) == "gloo"
    with pytest.raises(UserError, match="NCCL refuses two ranks on one GPU.*--dist-backend gloo"):
        dist_backend_for("auto", gpu, ranks_per_gpu=2)
    with pytest.raises(UserError, match="--dist-backend nccl needs GPUs"):
        dist_backend_for("nccl", cpu)
    assert parse_args(["/data", "--dist-backend", "gloo"]).dist_backend == "gloo"
    with pytest.raises(UserError, match="--dist-backend nccl needs GPUs"):  # a single process checks it too
        create_context(device="cpu", dist_backend="nccl")
    assert parse_args(["/data"]).dist_backend == "auto"


def _ranks_per_gpu_worker(rank: int, store_file: str, identities: list[str], out: str) -> None:
    import torch.distributed as dist
    from image_classification.context import ranks_per_gpu
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=len(identities))
    try:
        Path(out, str(rank)).write_text(str(ranks_per_gpu(identities[rank])))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("identities, expected", [(["GPU-a", "GPU-b"], 1), (["GPU-a", "GPU-a"], 2)])
def test_ranks_sharing_a_gpu_are_counted_by_the_gpus_identity(tmp_path, identities, expected):
    # Each rank may see its own GPU as cuda:0 (a GPU per process): only the UUIDs tell whether they share one.
    import torch.multiprocessing as mp
    (tmp_path / "out").mkdir()
    mp.spawn(_ranks_per_gpu_worker, args=(str(tmp_path / "store"), identities, str(tmp_path / "out")),
             nprocs=len(identities))
    assert [int((tmp_path / "out" / str(r)).read_text()) for r in range(len(identities))] == [expected] * 2


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
    with pytest.warns(UserWarning, match="--gpu-affinity socket pins .* this run is on cpu, so it is ignored"):
        assert set_affinity("socket", create_context(device="cpu")) is None


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


# --- runs that go wrong -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes of the generated dataset, 8 training and 2 validation images each, 48 px files."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    subprocess.run([sys.executable, "-m", "image_classification.data.generated", "--output", str(out), "--classes",
                    "4", "--train-per-class", "8", "--val-per-class", "2", "--image-size", "48"], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    return out


def folder_args(data: Path, workspace: Path, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on an image folder with the pytorch backend (8 batches of 4 per epoch)."""
    return [str(data), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", str(SIZE), "-b",
            "4", "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--workspace", str(workspace), *extra]


def float_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a checkpoint: model, EMA and optimizer state."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"state_dict.{k}": v for k, v in saved["state_dict"].items() if v.is_floating_point()}
    out.update({f"state_dict_ema.{k}": v for k, v in (saved.get("state_dict_ema") or {}).items()
                if v.is_floating_point()})
    for index, values in saved["optimizer"]["state"].items():
        out.update({f"optimizer.{index}.{k}": v for k, v in values.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return out


def stop_at_iteration(monkeypatch, stop_after: int) -> None:
    """Deliver SIGTERM to this process during training step number `stop_after` (counted from 1, this run)."""
    from image_classification.train import epoch as training
    real_step = training.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_after:
            signal.raise_signal(signal.SIGTERM)  # StopRequest's handler only sets its flag
        return real_step(*args, **kwargs)
    monkeypatch.setattr(training, "train_step", step)


@pytest.mark.parametrize("backend", ["pytorch", "dali-cpu"])
def test_resume_mid_epoch_equals_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, backend):
    # Dropout (b0's 0.2), stochastic depth, mixup and EMA all draw random numbers during the steps after the stop.
    extra = ["--data-backend", backend, "--survival_prob", "0.8", "--mixup", "0.2", "--use-ema", "0.9"]
    if backend.startswith("dali"):
        pytest.importorskip("nvidia.dali")
    full, split = tmp_path / "full", tmp_path / "split"
    train(folder_args(tiny_data, full, *extra))
    with monkeypatch.context() as patch:
        stop_at_iteration(patch, 8 + 3)  # epoch 1, after its third batch
        summary = train(folder_args(tiny_data, split, *extra))
    assert summary["interrupted"]
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (1, 3)
    train(folder_args(tiny_data, split, *extra, "--resume", str(split / "checkpoint.pth.tar")))
    expected, resumed = float_tensors(full / "checkpoint.pth.tar"), float_tensors(split / "checkpoint.pth.tar")
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        assert (value - resumed[name]).abs().max().item() <= 1e-6, name
    # The interrupted epoch is reported once, by the run that finished it, with the uninterrupted train.loss;
    # the run summary once, over both runs' epochs.
    ra, rb = read_report(full / "experiment_raport.json"), read_report(split / "experiment_raport.json")
    epochs = [r["step"][0] for r in rb if r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 1]
    assert epochs == [0, 0, 1, 1]  # one record per verbosity level
    assert epoch_summaries(ra)[1]["train.loss"] == epoch_summaries(rb)[1]["train.loss"]
    summaries = [r for r in rb if r["type"] == "LOG" and r["step"] == []]
    assert len(summaries) == 2 and by_step(rb)[()]["val.top1"] == by_step(ra)[()]["val.top1"]


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_resumes(tiny_data, tmp_path):
    # SLURM cancellation, preemption and systemd stop a job by sending SIGTERM to its whole process group: the
    # DataLoader workers receive it too and must leave the stop to the main process.
    argv = [sys.executable, "main.py", *folder_args(tiny_data, tmp_path, "--workers", "2", "--epochs", "3",
                                                     "--print-freq", "1")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    report = tmp_path / "experiment_raport.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # wait for the second epoch's first iteration
        if report.is_file() and '"step": [1, 1]' in report.read_text():
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "killed by signal" not in err and "Traceback" not in err
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] in (1, 2)
    summary = train(folder_args(tiny_data, tmp_path, "--workers", "2", "--epochs", "3", "--resume",
                                str(tmp_path / "checkpoint.pth.tar")))
    assert summary["epoch"] == 3 and not summary["interrupted"]


def test_diverging_run_stops_with_one_line_and_keeps_the_finite_checkpoint(tmp_path):
    # One finite epoch, then the same run resumed at a learning rate no network survives.
    train(run_args(tmp_path, "--run-epochs", "1"))
    finite = float_tensors(tmp_path / "checkpoint.pth.tar")
    result = subprocess.run([sys.executable, "main.py", *run_args(tmp_path, "--lr", "1e30", "--resume",
                                                                  str(tmp_path / "checkpoint.pth.tar"))],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("main.py: error: training diverged at epoch 1, iteration "), lines
    assert "last finite loss" in lines[0] and "--lr" in lines[0]
    after = float_tensors(tmp_path / "checkpoint.pth.tar")
    assert all(torch.equal(finite[k], after[k]) for k in finite)  # not overwritten
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path)
    writer.save(ckpt.Checkpoint(epoch=1, state_dict={"w": torch.ones(2)}), is_best=True)
    with pytest.raises(ckpt.CheckpointError, match=r"state_dict w holds NaN or infinite values"):
        writer.save(ckpt.Checkpoint(epoch=2, state_dict={"w": torch.tensor([1.0, float("nan")])}), is_best=True)
    with pytest.raises(ckpt.CheckpointError, match=r"state_dict_ema w"):
        writer.save(ckpt.Checkpoint(epoch=2, state_dict={"w": torch.ones(2)},
                                    extras={"state_dict_ema": {"w": torch.full((2,), float("inf"))}}), is_best=False)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert torch.load(tmp_path / name, weights_only=True)["epoch"] == 1


def test_fp16_skipped_steps_are_normal_until_too_many_in_a_row():
    from image_classification.train.divergence import MAX_SKIPPED_STEPS, DivergenceError, DivergenceGuard
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # The fp16 path's scaler, on CPU, started high enough to halve 200 times without reaching 0.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, enabled=True)
    guard = DivergenceGuard(scaler, "causes")
    x = torch.ones(1, 2)

    def step(factor: float) -> None:
        loss = model(x).sum() * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        guard.after_optimizer_step(0, 1)
        guard.check_loss(loss.item(), 0, 1)  # a non-finite loss is the scaler's business here

    for _ in range(MAX_SKIPPED_STEPS - 1):
        step(float("inf"))
    step(1.0)  # one finite step resets the count
    assert guard.skipped_steps == 0
    for _ in range(MAX_SKIPPED_STEPS - 1):
        step(float("nan"))
    with pytest.raises(DivergenceError, match=f"not finite for {MAX_SKIPPED_STEPS} steps in a row"):
        step(float("nan"))
    # Without loss scaling the first non-finite loss the loop reads stops the run.
    plain = DivergenceGuard(torch.amp.GradScaler("cpu", enabled=False), "a learning rate too high (--lr)")
    plain.check_loss(2.5, 0, 10)
    with pytest.raises(DivergenceError, match=r"epoch 0, iteration 20: the training loss is nan \(last finite "
                                              r"loss 2.50000 at epoch 0, iteration 10\); likely causes: a learning"):
        plain.check_loss(float("nan"), 0, 20)


# --- the workspace -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode().strip()}")
    # The size of one checkpoint of this run, measured, then a file system with room for it but not for two.
    measure = tmp_path / "measure"
    train(run_args(measure, "--run-epochs", "1", "--training-only"))
    size = (measure / "checkpoint.pth.tar").stat().st_size
    small = tmp_path / "small"
    small.mkdir()
    command = " ".join(shlex.quote(a) for a in [sys.executable, "main.py", *run_args(small, "--training-only")])
    script = f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {shlex.quote(str(small))} && {command}; " \
             f"status=$?; ls -a {shlex.quote(str(small))}; " \
             f"{sys.executable} -c \"import torch; print('epoch', torch.load('{small}/checkpoint.pth.tar', " \
             f"weights_only=True)['epoch'])\"; exit $status"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"main.py: error: cannot write {small / 'checkpoint.pth.tar'}: no space left")
    assert re.search(r"\(\d+\.\d (KiB|MiB) free, about \d+\.\d MiB needed\); the previous file is kept", errors[0])
    listing = result.stdout.split()
    assert "checkpoint.pth.tar" in listing and not [n for n in listing if n.endswith(".tmp")]
    assert "epoch 1" in result.stdout  # the first epoch's checkpoint, intact


@pytest.mark.slow
def test_a_small_read_only_file_system_is_reported_as_read_only(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode().strip()}")
    train(run_args(tmp_path / "ws", "--run-epochs", "1", "--training-only"))
    small = tmp_path / "small"
    small.mkdir()
    command = shlex.join([sys.executable, "checkpoint2model.py", "--checkpoint-path",
                          str(tmp_path / "ws" / "checkpoint.pth.tar"), "--weight-path", str(small / "weights.pth")])
    # 64 KiB, less than the weights need: the free-space comparison alone would call it full.
    script = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(small))} && mount -o remount,ro " \
             f"{shlex.quote(str(small))} && {command}"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"checkpoint2model.py: error: cannot write {small / 'weights.pth'}: its file system is read-only; the previous "
        "file is kept"]


def test_no_temporary_file_survives_a_killed_write_and_files_follow_the_umask(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    code = ("import os, signal, torch\n"
            "os.umask(0o027)\n"
            "from image_classification import checkpoint as c\n"
            f"c.atomic_save({{'epoch': 1}}, {str(path)!r})\n"
            f"c.write_class_names({str(tmp_path)!r}, ['a', 'b'])\n"
            "real = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    real(obj, f, *a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
            "torch.save = save\n"
            f"c.atomic_save({{'epoch': 2, 'w': torch.zeros(100000)}}, {str(path)!r})\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth.tar", "classes.txt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1
    for name in ("checkpoint.pth.tar", "classes.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # 0o666 under umask 027, as torch.save


def test_refused_run_leaves_no_report_and_an_earlier_report_untouched(tmp_path):
    with pytest.raises(ckpt.CheckpointError):
        train(run_args(tmp_path, "--resume", str(tmp_path / "missing.pth.tar")))
    assert list(tmp_path.iterdir()) == []
    report = tmp_path / "experiment_raport.json"
    report.write_text("DLLL {}\n")
    with pytest.raises(ValueError, match="data folder"):
        train(run_args(tmp_path, "--data-backend", "pytorch", str(tmp_path / "no-such-data")))
    assert report.read_text() == "DLLL {}\n"


def test_resume_mismatch_names_the_architecture_and_the_class_count(tmp_path):
    train(run_args(tmp_path, "--run-epochs", "1", "--arch", "efficientnet-b1"))
    path = str(tmp_path / "checkpoint.pth.tar")
    result = subprocess.run([sys.executable, "main.py", *run_args(tmp_path, "--resume", path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"main.py: error: --resume {path}: the checkpoint is efficientnet-b1, --arch is efficientnet-b0; resume "
        "with --arch efficientnet-b1"]
    with pytest.raises(ValueError, match=r"the checkpoint has 4 classes, --num_classes is 5; resume with "
                                         r"--num_classes 4$"):
        train(run_args(tmp_path, "--arch", "efficientnet-b1", "--num_classes", "5", "--resume", path))


def test_weights_made_non_finite_by_the_last_step_stop_the_run_before_validation(tmp_path, monkeypatch):
    # The loss of the epoch's last step is finite (computed before the step), the step itself leaves NaN weights.
    from image_classification.train import epoch as training
    real_step = training.train_step

    calls = {"n": 0}

    def poisoned_step(engine, *args, **kwargs):
        loss = real_step(engine, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the epoch's last (--prof 3)
            with torch.no_grad():
                engine.model.classifier.fc.bias.fill_(float("nan"))
        return loss
    monkeypatch.setattr(training, "train_step", poisoned_step)
    from image_classification.train.divergence import DivergenceError
    with pytest.raises(DivergenceError, match=r"epoch 0, iteration 3: the weights hold NaN or infinite values "
                                              r"\(classifier.fc.bias\) after its last step"):
        train(run_args(tmp_path, "--print-freq", "100"))
    assert not (tmp_path / "checkpoint.pth.tar").exists()
