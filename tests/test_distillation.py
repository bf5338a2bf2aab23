"""Knowledge distillation (distillation.py): the Hinton loss on known numbers, a teacher the optimizer never
touches, train.kd_loss in the report, exact --resume and the refusal of another teacher, timm teachers, and a
2-process gloo run equal to one process. CPU, tiny models and sizes."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_model
from image_classification.toolkit import distillation
from image_classification.arguments import parse_args, parse_config
from image_classification.checkpoint import CheckpointError
from image_classification.cli import UserError
from image_classification.context import create_context
from image_classification.models import get_entry
from image_classification.train.optimizers import build_optimizer
from reports import by_step, epoch_summaries, read_report
from runs import train
from test_multiproc import _run

SIZE = 32


def run_args(workspace: Path, teacher: Path | None, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on the synthetic backend (2 epochs of 3 batches of 4), distilled from an
    efficientnet-b0 teacher when `teacher` is given."""
    kd = ["--teacher-arch", "efficientnet-b0", "--teacher-weights", str(teacher)] if teacher else []
    return ["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
            "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--prof", "3", "--workspace", str(workspace), *kd, *extra]


def b0_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(get_entry("efficientnet-b0")(num_classes=4).state_dict(), path)
    return path


# --- the loss ---------------------------------------------------------------------------------------------------

def test_kd_loss_is_hintons_on_a_hand_computed_batch():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    t = 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]
    kl = [sum(p * math.log(p / q) for p, q in zip(softmax(tr), softmax(sr)))
          for sr, tr in zip(student.tolist(), teacher.tolist())]
    expected = t * t * sum(kl) / len(kl)
    assert distillation.kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert distillation.kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)

    # (1-A)·task + A·T²·KL, with a teacher that outputs `teacher` whatever the images.
    fixed = nn.Module()
    fixed.forward = lambda images: teacher
    task = torch.tensor(1.5)
    distiller = distillation.DistillationLoss(lambda logits, target: task, fixed, alpha=0.25, temperature=t)
    assert distiller(student, None, torch.zeros(2, 3, 8, 8)).item() == pytest.approx(0.75 * 1.5 + 0.25 * expected,
                                                                                     rel=1e-6)
    assert distiller.last_terms()[0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("amp", [False, True])
def test_the_teacher_is_untouched_by_training_steps(amp):
    from image_classification.train.epoch import train_step
    from image_classification.train.state import Trainer
    ctx = create_context(device="cpu", amp=amp)
    student = tiny_model.TinyEntry()(num_classes=3)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 3))
    distiller = distillation.DistillationLoss(nn.CrossEntropyLoss(), teacher, alpha=0.5, temperature=2.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = build_optimizer(student, optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=1e-4)
    engine = Trainer(ctx=ctx, model=student, train_model=student, loss=distiller, optimizer=optimizer,
                     scaler=ctx.grad_scaler())
    student_before = [p.clone() for p in student.parameters()]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        images, target = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = train_step(engine, images, target, optimizer_step=True)
        assert torch.isfinite(loss).all() and distiller.last_terms()[0].dtype == torch.float32
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # weights and BN statistics
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), student_before))


# --- runs -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_with_a_teacher_equals_the_uninterrupted_run_and_another_teacher_is_refused(tmp_path):
    teacher = b0_teacher(tmp_path / "teacher.pth", seed=1)
    flags = ("--mixup", "0.2", "--kd-alpha", "0.7", "--kd-temperature", "2", "--use-ema", "0.9")
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(full, teacher, *flags))
    train(run_args(split, teacher, *flags, "--run-epochs", "1"))
    moved = tmp_path / "elsewhere.pth"  # the same file under another name is the same teacher
    moved.write_bytes(teacher.read_bytes())
    train(run_args(split, moved, *flags, "--resume", str(split / "checkpoint.pth.tar")))
    a = torch.load(full / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    assert a["teacher"] == {"arch": "efficientnet-b0", "weights": str(teacher),
                            "sha256": distillation.file_sha256(teacher)}
    assert not any(k.startswith("teacher") for k in a["state_dict"])  # its weights stay out
    ra, rb = read_report(full / "experiment_raport.json"), read_report(split / "experiment_raport.json")
    assert "train.kd_loss" in {r["metric"] for r in ra if r["type"] == "METADATA"}
    iterations = [data for step, data in by_step(ra).items() if len(step) == 2 and "train.loss" in data]
    assert iterations and all(data["train.kd_loss"] > 0 for data in iterations)
    for epoch in (0, 1):
        for key in ("train.loss", "train.kd_loss", "val.loss"):
            assert epoch_summaries(ra)[epoch][key] == epoch_summaries(rb)[epoch][key], (epoch, key)

    other = b0_teacher(tmp_path / "other.pth", seed=2)
    more = ("--epochs", "3", "--resume", str(split / "checkpoint.pth.tar"))
    with pytest.raises(CheckpointError, match=r"^--resume .*: the checkpoint was trained with teacher efficientnet-b0 "
                                              rf".*elsewhere.pth \(sha256 {distillation.file_sha256(teacher)[:16]}…\), "
                                              r"this run is with teacher efficientnet-b0 .*other.pth"):
        train(run_args(split, other, *flags, *more))
    with pytest.raises(CheckpointError, match=r"this run is without a teacher; resume with the checkpoint's "
                                              r"--teacher-arch and --teacher-weights$"):
        train(run_args(split, None, "--mixup", "0.2", "--use-ema", "0.9", *more))
    # Evaluating a distilled checkpoint needs no teacher.
    assert train(run_args(split, None, "--evaluate", "--resume", str(split / "checkpoint.pth.tar")))["val.top1"] >= 0


def test_a_timm_teacher_distils_a_run(tmp_path):
    timm = pytest.importorskip("timm")
    weights = tmp_path / "resnet.pth"
    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=4).state_dict()}, weights)
    summary = train(run_args(tmp_path, None, "--teacher-arch", "timm:test_resnet", "--teacher-weights", str(weights),
                             "--epochs", "1", "--no-checkpoints"))
    assert summary["train.kd_loss"] > 0
    with pytest.raises(UserError, match=r"^--teacher-weights .*resnet.pth: does not fit timm's test_resnet for 5 "
                                        r"classes: 0 missing keys"):
        train(run_args(tmp_path, None, "--teacher-arch", "timm:test_resnet", "--teacher-weights", str(weights),
                       "--num_classes", "5", "--epochs", "1", "--no-checkpoints"))
    with pytest.raises(UserError, match=r"^--teacher-arch timm:no_such_model: not a timm model"):
        train(run_args(tmp_path, None, "--teacher-arch", "timm:no_such_model", "--teacher-weights", str(weights)))


@pytest.mark.parametrize("extra,message", [
    (("--teacher-arch", "efficientnet-b0"), r"^--teacher-arch needs --teacher-weights FILE"),
    (("--kd-alpha", "0.3"), r"^--kd-alpha need\(s\) --teacher-arch$"),
    (("--teacher-arch", "efficientnet-b0", "--teacher-weights", "missing.pth"),
     r"^--teacher-weights missing.pth: no such file$"),
    (("--teacher-arch", "efficientnet-b0", "--teacher-weights", "main.py", "--evaluate"),
     r"^--teacher-arch distils during training; not with --evaluate$"),
])
def test_flags_that_cannot_distil_are_refused(extra, message, tmp_path):
    config = parse_config(run_args(tmp_path, None, *extra))
    with pytest.raises(UserError, match=message):
        distillation.check_flags(config)


def test_unknown_teacher_arch_lists_the_registry(tmp_path):
    with pytest.raises(UserError, match=r"^unknown --teacher-arch 'resnet50'; available: .*efficientnet-b0.*, or "
                                        r"timm:<model> for a timm model$"):
        distillation.build_teacher("resnet50", str(tmp_path / "x.pth"), 4)


def test_another_archs_checkpoint_as_student_or_teacher_weights_names_both_archs(tmp_path):
    """main.py --pretrained-from-file and --teacher-weights: one line naming the arch the checkpoint records."""
    train(run_args(tmp_path / "b1", None, "--arch", "efficientnet-b1", "--epochs", "1", "--prof", "1",
                   "--training-only"))
    checkpoint = tmp_path / "b1" / "checkpoint.pth.tar"
    with pytest.raises(UserError) as refused:
        train(run_args(tmp_path / "student", None, "--pretrained-from-file", str(checkpoint)))
    assert str(refused.value) == (f"{checkpoint}: holds efficientnet-b1 weights (as the checkpoint records), the model "
                                  "is efficientnet-b0; use --arch efficientnet-b1")
    with pytest.raises(UserError) as refused:
        train(run_args(tmp_path / "distilled", checkpoint))
    assert str(refused.value) == (f"--teacher-weights {checkpoint}: holds efficientnet-b1 weights (as the checkpoint records), the model "
                                  "is efficientnet-b0; use --teacher-arch efficientnet-b1")


def test_flags_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(["-h"])
    text = capsys.readouterr().out
    for flag in ("--teacher-arch", "--teacher-weights", "--kd-alpha", "--kd-temperature"):
        assert flag in text, flag


# --- two processes ----------------------------------------------------------------------------------------------

def _gloo_run(tmp_path: Path, name: str, nproc: int, batch: int, teacher: Path, *extra: str) -> Path:
    """test_multiproc's run (BN-free tiny model, rank-sharded in-memory data), distilled from `teacher`."""
    return _run(tmp_path, name, nproc, batch, "--teacher-arch", "tiny-bn-free", "--teacher-weights", str(teacher),
                "--kd-alpha", "0.6", "--kd-temperature", "3", "--dist-backend", "gloo", *extra)


@pytest.mark.slow
def test_two_gloo_processes_and_accumulation_distil_as_one_process_on_the_same_global_batch(tmp_path):
    teacher = tmp_path / "teacher.pth"
    weights = tiny_model.TinyEntry()(num_classes=3).state_dict()
    torch.save({k: v.flip(0) * 1.5 for k, v in weights.items()}, teacher)  # another model than the student
    single = _gloo_run(tmp_path, "single", 1, 8, teacher)
    double = _gloo_run(tmp_path, "double", 2, 4, teacher)
    accumulated = _gloo_run(tmp_path, "accumulated", 1, 4, teacher, "--optimizer-batch-size", "8")
    a = torch.load(single / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(double / "checkpoint.pth.tar", weights_only=True)
    c = torch.load(accumulated / "checkpoint.pth.tar", weights_only=True)
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["state_dict"][name], c["state_dict"][name], rtol=1e-5, atol=1e-6)
    assert b["teacher"]["sha256"] == distillation.file_sha256(teacher)
    ea = epoch_summaries(read_report(single / "experiment_raport.json"))
    eb = epoch_summaries(read_report(double / "experiment_raport.json"))
    for epoch in (0, 1):
        assert ea[epoch]["train.kd_loss"] > 0
        for key in ("train.loss", "train.kd_loss"):
            assert ea[epoch][key] == pytest.approx(eb[epoch][key], rel=1e-5, abs=1e-6), (epoch, key)


@pytest.mark.slow
def test_a_distilled_run_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    from runs import float_tensors, stop_at_iteration
    teacher = b0_teacher(tmp_path / "teacher.pth", seed=1)
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(full, teacher, "--cutmix", "0.5"))
    with monkeypatch.context() as patch:
        stop_at_iteration(patch, 3 + 2)  # epoch 1, after its second batch
        assert train(run_args(split, teacher, "--cutmix", "0.5"))["interrupted"]
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (1, 2)
    train(run_args(split, teacher, "--cutmix", "0.5", "--resume", str(split / "checkpoint.pth.tar")))
    expected, resumed = float_tensors(full / "checkpoint.pth.tar"), float_tensors(split / "checkpoint.pth.tar")
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name
    ra, rb = epoch_summaries(read_report(full / "experiment_raport.json")), \
        epoch_summaries(read_report(split / "experiment_raport.json"))
    assert ra[1]["train.kd_loss"] == rb[1]["train.kd_loss"] and ra[1]["train.loss"] == rb[1]["train.loss"]
