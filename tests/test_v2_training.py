"""EfficientNetV2 training: CutMix, the stage flags, and stage-wise progressive runs of main.py (resolution and
augmentation change per stage on every backend, exact resume mid-stage and at a stage boundary). CPU, tiny sizes.

The V2-S layout (fused blocks without depthwise convs, parameter count) and its forward/backward are tested in
tests/test_models.py; the schedule's arithmetic in tests/test_progressive.py.
"""
from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from image_classification.arguments import parse_args, parse_config
from image_classification.config import Config
from image_classification.toolkit import progressive
from image_classification.train import epoch as train_epoch
from image_classification.train import job as train_job
from image_classification.context import ExecutionContext
from image_classification.data import build_train_loader
from image_classification.data.generated import generate_dataset
from image_classification.data.mixup import Mixup, box_lambda, cut_and_paste, cutmix_box, mix
from image_classification.toolkit.progressive import progressive_schedule
from reports import epoch_summaries, read_report
from test_training import train

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 4


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors gain nothing from threads, and on a busy machine spinning OpenMP threads make a step 30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("v2data"), num_classes=CLASSES, train_per_class=4,
                            val_per_class=2, image_size=56, seed=0)


def staged_args(workspace: Path, *extra: str, data: str | None = None, arch: str = "efficientnet-b0") -> list[str]:
    """A tiny 2-stage run: 32 px then 48 px, validated at 40 px, two batches of 4 per epoch."""
    return ([data] if data else []) + [
        "--arch", arch, "--num_classes", str(CLASSES), "-b", "4", "--workers", "0", "--prof", "2",
        "--epochs", "2", "--n-stages", "2", "--base-image-size", "32", "--image-size", "48", "--eval-image-size", "40",
        "--print-freq", "1", "--seed", "5", "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01",
        "--lr-schedule", "cosine", "--workspace", str(workspace), *extra]


# --- CutMix ---------------------------------------------------------------------------------------------------

def test_cutmix_box_is_clipped_and_lambda_is_the_kept_area():
    rng = np.random.RandomState(0)
    for lam in (0.0, 0.3, 0.75, 0.99, 1.0):
        for _ in range(50):
            top, bottom, left, right = cutmix_box(20, 30, lam, rng)
            assert 0 <= top <= bottom <= 20 and 0 <= left <= right <= 30
            assert (bottom - top) <= int(20 * (1 - lam) ** 0.5) and (right - left) <= int(30 * (1 - lam) ** 0.5)
            assert box_lambda((top, bottom, left, right), 20, 30) >= lam - 1e-9  # clipping only keeps more
    # A box fully inside the image covers (1 - λ) of it, up to the integer sides.
    box = cutmix_box(100, 100, 0.75, np.random.RandomState(3))
    if box[0] > 0 and box[1] < 100 and box[2] > 0 and box[3] < 100:
        assert box_lambda(box, 100, 100) == pytest.approx(0.75, abs=0.01)
    assert box_lambda((2, 5, 1, 4), 10, 10) == pytest.approx(1 - 9 / 100)


def test_cut_and_paste_takes_the_box_from_the_partner_and_weights_targets_by_area():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 6, 8).contiguous()
    target = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    perm = torch.tensor([2, 0, 1])
    box = (1, 4, 2, 6)  # 3 x 4 of 6 x 8: λ = 1 - 12/48 = 0.75
    mixed, soft = cut_and_paste(images, target, box, perm)
    for i in range(3):
        inside = torch.zeros(6, 8, dtype=torch.bool)
        inside[1:4, 2:6] = True
        assert (mixed[i][:, inside] == float(perm[i])).all()
        assert (mixed[i][:, ~inside] == float(i)).all()
    assert torch.equal(images[:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))  # the input is left alone
    torch.testing.assert_close(soft, 0.75 * target + 0.25 * target[perm])
    torch.testing.assert_close(soft.sum(1), torch.ones(3))


def test_mixer_with_mixup_and_cutmix_uses_one_per_batch_and_targets_sum_to_one():
    torch.manual_seed(0), np.random.seed(0)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.randint(0, 5, (8,))
    mixer = Mixup(0.4, 5, cutmix=1.0)
    kinds = []
    for _ in range(200):
        mixed, soft = mixer(images, labels)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        assert soft.shape == (8, 5) and (soft >= 0).all()
        # CutMix leaves every pixel equal to some sample's pixel; mixup blends them.
        pasted = (mixed.unsqueeze(1) == images.unsqueeze(0)).any(1).all()
        kinds.append("cutmix" if pasted else "mixup")
    assert 70 < kinds.count("cutmix") < 130


def test_mixup_alone_draws_as_before_and_off_gives_one_hot():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(1), np.random.seed(1)
    mixed, soft = Mixup(0.2, 3)(images, labels)
    torch.manual_seed(1), np.random.seed(1)
    lam = float(np.random.beta(0.2, 0.2))  # λ first (numpy), then the pairing (torch): the reference's order
    expected = mix(images, F.one_hot(labels, 3).float(), lam, torch.randperm(4))
    torch.testing.assert_close(mixed, expected[0])
    torch.testing.assert_close(soft, expected[1])
    same, one_hot = Mixup(0.0, 3, cutmix=0.0)(images, labels)
    assert same is images and torch.equal(one_hot, F.one_hot(labels, 3).float())
    with pytest.raises(ValueError, match="--cutmix"):
        Mixup(0.2, 3, cutmix=-1.0)


# --- flags ----------------------------------------------------------------------------------------------------

def test_stage_flags_defaults_and_one_stage_ignores_base_values():
    config = parse_config(["/d", "--arch", "efficientnet-v2-s", "--epochs", "8", "--n-stages", "4"])
    schedule = progressive_schedule(config, 300)
    assert (schedule.base_image_size, schedule.base_randaug_magnitude, schedule.base_mixup, schedule.base_cutmix) == \
        (300, 9, 0.0, 0.0)  # the base values default to the final size/magnitude and to no mixing
    config = parse_config(["/d", "--arch", "efficientnet-b0", "--epochs", "3", "--image-size", "64", "--mixup",
                           "0.0", "--base-image-size", "16", "--base-mixup", "0.5", "--base-cutmix", "1",
                           "--base-randaug-magnitude", "20"])
    schedule = progressive_schedule(config, 224)  # --n-stages 1 (default): base values have no effect
    assert {(s.image_size, s.mixup, s.cutmix, s.randaug_magnitude) for s in map(schedule.settings, range(3))} == \
        {(64, 0.0, 0.0, 9)}
    assert not schedule.mixes()  # so the loss stays on integer labels, exactly as without the base flags


def test_help_documents_the_stage_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--n-stages", "--base-image-size", "--base-mixup", "--cutmix", "--base-cutmix", "--randaug-magnitude",
                 "--base-randaug-magnitude", "--eval-image-size", "randaugment"):
        assert flag in text, flag
    assert "With --n-stages 1 the --base-* values have no effect" in text


@pytest.mark.parametrize("extra,message,status", [
    (["--n-stages", "3"], "--n-stages 3 is more than --epochs 2", 1),  # flags that disagree: found when set up
    # A value out of its own range: refused while parsing (status 2).
    (["--n-stages", "0"], "argument --n-stages: must be an integer >= 1", 2),
    (["--n-stages", "2", "--base-image-size", "0"], "argument --base-image-size: must be an integer >= 1", 2),
    (["--augmentation", "randaugment", "--randaug-magnitude", "31"],
     "argument --randaug-magnitude: must be an integer in [0, 30]", 2),
    (["--n-stages", "2", "--base-randaug-magnitude=-1"],
     "argument --base-randaug-magnitude: must be an integer in [0, 30]", 2),
    (["--cutmix=-0.5"], "argument --cutmix: must be a finite number >= 0", 2),
    (["--eval-image-size=-3"], "argument --eval-image-size: must be an integer >= 1", 2),
])
def test_inconsistent_stage_flags_are_one_line_errors(tmp_path, capsys, extra, message, status):
    sys.path.insert(0, str(ROOT))
    try:
        import main as main_py
    finally:
        sys.path.remove(str(ROOT))
    argv = ["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--epochs", "2", "--workspace", str(tmp_path),
            *extra]
    with pytest.raises(SystemExit) as exc:
        main_py.main(argv)
    assert exc.value.code == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"main.py: error: {message}"), lines
    assert not (tmp_path / "experiment_raport.json").exists()  # refused before anything ran


# --- progressive runs -----------------------------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch):
    """Shapes of the batches trained on and validated on, and the settings each train loader was built for."""
    seen = {"train": [], "val": [], "loaders": []}
    train_step, validate, build = train_epoch.train_step, train_job.validate, progressive.stage_train_loader

    def record_train(engine, images, target, optimizer_step):
        seen["train"].append(tuple(images.shape[-2:]))
        return train_step(engine, images, target, optimizer_step)

    def record_val(model, loader, *args, **kwargs):
        seen["val"].append(tuple(next(iter(loader))[0].shape[-2:]))
        return validate(model, loader, *args, **kwargs)

    def record_build(args, ctx, settings, seed):
        seen["loaders"].append((settings.image_size, settings.randaug_magnitude))
        return build(args, ctx, settings, seed)

    monkeypatch.setattr(train_epoch, "train_step", record_train)
    monkeypatch.setattr(train_job, "validate", record_val)
    monkeypatch.setattr(progressive, "stage_train_loader", record_build)
    return seen


@pytest.mark.parametrize("backend,arch,extra", [
    ("synthetic", "efficientnet-v2-s", ["--mixup", "0.2", "--cutmix", "1.0"]),
    ("pytorch", "efficientnet-b0", ["--augmentation", "randaugment", "--base-randaug-magnitude", "5",
                                    "--randaug-magnitude", "15", "--workers", "1"]),
    ("dali-cpu", "efficientnet-b0", ["--augmentation", "randaugment", "--base-randaug-magnitude", "5",
                                     "--randaug-magnitude", "15", "--workers", "1"]),
])
def test_each_stage_trains_at_its_size_and_validation_stays_at_eval_size(tmp_path, dataset, recorded, backend,
                                                                        arch, extra):
    if backend.startswith("dali"):
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    data = None if backend == "synthetic" else str(dataset)
    train(staged_args(tmp_path, "--data-backend", backend, *extra, data=data, arch=arch))
    assert recorded["train"] == [(32, 32)] * 2 + [(48, 48)] * 2
    assert recorded["val"] == [(40, 40)] * 2
    magnitudes = (5, 15) if backend != "synthetic" else (9, 9)
    assert recorded["loaders"] == [(32, magnitudes[0]), (48, magnitudes[1])]
    epochs = epoch_summaries(read_report(tmp_path / "experiment_raport.json"))
    assert [epochs[e]["train.image_size"] for e in (0, 1)] == [32, 48]


@pytest.mark.slow
def test_resume_mid_stage_and_at_the_boundary_equals_the_uninterrupted_run(tmp_path, dataset, recorded):
    flags = ["--data-backend", "pytorch", "--epochs", "4", "--augmentation", "randaugment", "--base-randaug-magnitude",
             "5", "--randaug-magnitude", "15", "--mixup", "0.2", "--cutmix", "1.0", "--use-ema", "0.9"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(staged_args(full, *flags, data=str(dataset)))
    assert recorded["train"] == [(32, 32)] * 4 + [(48, 48)] * 4
    recorded["train"].clear()
    checkpoint = str(split / "checkpoint.pth.tar")
    train(staged_args(split, *flags, "--run-epochs", "1", data=str(dataset)))                       # epoch 0
    train(staged_args(split, *flags, "--run-epochs", "1", "--resume", checkpoint, data=str(dataset)))  # 1: mid-stage
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2  # the next epoch opens stage 2
    recorded["loaders"].clear()
    train(staged_args(split, *flags, "--resume", checkpoint, data=str(dataset)))                     # 2, 3: boundary
    assert recorded["loaders"] == [(48, 15)]  # resumed straight into the last stage's loader
    assert recorded["train"] == [(32, 32)] * 4 + [(48, 48)] * 4

    a, b = (torch.load(p / "checkpoint.pth.tar", weights_only=True) for p in (full, split))
    for key in ("state_dict", "state_dict_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    ra, rb = (epoch_summaries(read_report(p / "experiment_raport.json")) for p in (full, split))
    for epoch in range(4):
        for key in ("train.loss", "train.image_size", "val.loss", "val.top1", "val_ema.loss"):
            assert ra[epoch][key] == rb[epoch][key], (epoch, key)


def test_pytorch_loader_close_stops_its_workers(dataset):
    loader = build_train_loader("pytorch", str(dataset), image_size=32, batch_size=4, ctx=ExecutionContext(),
                                num_classes=CLASSES, workers=1, seed=0)
    before = set(multiprocessing.active_children())
    loader.set_epoch(0)
    assert len(list(loader)) == len(loader)
    workers = set(multiprocessing.active_children()) - before
    assert workers  # persistent: still alive after the epoch
    loader.close()
    assert not workers & set(multiprocessing.active_children())


# --- launch.py ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["AMP", "TF32", "FP32"])
def test_launch_gives_v2_s_the_tf2_progressive_recipe(precision):
    from image_classification.launcher import build_args
    base = ["--model", "efficientnet-v2-s", "--precision", precision, "--platform", "DGXA100", "/imagenet"]
    args = build_args(base + ["--mode", "convergence"])
    got = {k: getattr(args, k) for k in ("epochs", "n_stages", "base_image_size", "image_size", "eval_image_size",
                                         "augmentation", "base_randaug_magnitude", "randaug_magnitude", "mixup",
                                         "cutmix", "use_ema", "lr", "optimizer_batch_size", "optimizer")}
    assert got == dict(epochs=350, n_stages=4, base_image_size=128, image_size=300, eval_image_size=384,
                       augmentation="randaugment", base_randaug_magnitude=15, randaug_magnitude=30, mixup=0.0,
                       cutmix=0.0, use_ema=0.9999, lr=0.16, optimizer_batch_size=4096, optimizer="rmsprop")
    schedule = progressive_schedule(Config.from_args(args), 300)
    assert [schedule.settings(e).image_size for e in (0, 87, 88, 175, 263, 349)] == [128, 128, 185, 243, 300, 300]
    # Benchmarks train at the final size; the inference benchmark evaluates at 384.
    assert build_args(base + ["--mode", "benchmark_training"]).n_stages == 1
    assert build_args(base + ["--mode", "benchmark_training_short"]).n_stages == 1
    assert build_args(base + ["--mode", "benchmark_inference"]).eval_image_size == 384
