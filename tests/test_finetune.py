"""Fine-tuning flags (finetune.py): layer-wise LR decay and the classifier's LR factor through the optimizer groups,
the LR schedule and --resume; frozen parts that neither train nor move their BatchNorm statistics; the zero head.
CPU, efficientnet-b0 at 32 px on the synthetic backend."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from image_classification.arguments import parse_args, parse_config
from image_classification.checkpoint import CheckpointError
from image_classification.cli import UserError
from image_classification.models import get_entry
from image_classification.toolkit import finetune
from image_classification.train.optimizers import job_optimizer
from image_classification.train.schedules import LRSchedule, lr_at, set_lr
from runs import train

SIZE = 32
B0_BLOCKS = 16


def run_args(workspace: Path, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on the synthetic backend: 2 epochs of 3 batches of 4."""
    return ["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
            "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--prof", "3", "--workspace", str(workspace), *extra]


def b0() -> torch.nn.Module:
    return get_entry("efficientnet-b0")(num_classes=4)


# --- layer decay and the head's LR ------------------------------------------------------------------------------

def test_layer_decay_scales_each_depth_and_the_head_on_top():
    model = b0()
    scales = finetune.lr_scales(model, layer_decay=0.5, head_lr_scale=10.0)
    top = B0_BLOCKS + 1
    assert scales["stem.conv.weight"] == scales["stem.bn.bias"] == 0.5 ** top
    assert scales["layers.0.block0.depsep.conv.weight"] == 0.5 ** (top - 1)
    assert scales["layers.1.block1.se.squeeze.bias"] == 0.5 ** (top - 3)
    assert scales["layers.6.block0.proj.bn.weight"] == 0.5 ** 1  # the last block
    assert scales["features.conv.weight"] == scales["features.bn.weight"] == 1.0
    assert scales["classifier.fc.weight"] == scales["classifier.fc.bias"] == 10.0
    assert finetune.lr_scales(model) is None  # no flag: the reference's two groups, without factors
    assert finetune.lr_scales(model, head_lr_scale=3.0)["layers.0.block0.depsep.conv.weight"] == 1.0


def test_groups_keep_bn_without_weight_decay_and_the_schedule_applies_each_factor():
    model = b0()
    config = parse_config(run_args(Path("."), "--layer-decay", "0.8", "--head-lr-scale", "4", "--wd", "1e-4",
                                   "--epochs", "5"))
    optimizer = job_optimizer(model, config)
    scales = finetune.lr_scales(model, layer_decay=0.8, head_lr_scale=4.0)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter once
    for group in optimizer.param_groups:
        members = [names[id(p)] for p in group["params"]]
        assert {scales[n] for n in members} == {group["lr_scale"]}
        bn = {"bn" in n for n in members}
        assert len(bn) == 1 and group["weight_decay"] == (0.0 if bn.pop() else 1e-4)
    # BN groups first (the reference's order), each split by depth: 2 x (stem + 16 blocks + head) + classifier.
    assert len(optimizer.param_groups) == 2 * (B0_BLOCKS + 2) + 1
    assert "bn" in names[id(optimizer.param_groups[0]["params"][0])]

    lr_of = LRSchedule.from_config(config).lr_of
    for epoch in (0, 1, 3):  # warmup, then cosine
        set_lr(optimizer, lr_of(epoch))
        expected = lr_at(epoch, schedule="cosine", base_lr=0.01, epochs=5, warmup=1)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected * group["lr_scale"], rel=1e-12)
    # The factors travel in the optimizer's state dict, so a resumed optimizer schedules the same LRs.
    fresh = job_optimizer(b0(), config)
    for group in fresh.param_groups:
        group["lr_scale"] = 1.0
    fresh.load_state_dict(optimizer.state_dict())
    set_lr(fresh, lr_of(3))
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in optimizer.param_groups]


@pytest.mark.slow
def test_resume_with_layer_decay_and_freezing_equals_the_uninterrupted_run(tmp_path):
    flags = ("--layer-decay", "0.7", "--head-lr-scale", "3", "--freeze-until", "layers.0.block0", "--use-ema",
             "0.9")
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(full, *flags))
    train(run_args(split, *flags, "--run-epochs", "1"))
    train(run_args(split, *flags, "--resume", str(split / "checkpoint.pth.tar")))
    a = torch.load(full / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    # Epoch 1's LR (cosine after 1 warmup epoch, 2 epochs: the base LR) times each group's factor.
    for group in b["optimizer"]["param_groups"]:
        assert group["lr"] == pytest.approx(0.01 * group["lr_scale"], rel=1e-12)
    assert sorted({g["lr_scale"] for g in b["optimizer"]["param_groups"]})[-1] == 3.0

    # Other factors or another freeze point would silently keep the checkpoint's groups (or fail to load).
    for changed in (("--layer-decay", "0.6"), ("--freeze-until", "stem")):
        argv = run_args(split, *flags, "--epochs", "3", *changed, "--resume", str(split / "checkpoint.pth.tar"))
        with pytest.raises(CheckpointError, match=r"optimizer groups .* differ from this run's .* resume with the "
                                                  r"run's --layer-decay, --head-lr-scale and --freeze-until"):
            train(argv)


# --- freezing ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_frozen_parameters_and_bn_statistics_do_not_move(tmp_path):
    start = tmp_path / "start.pth"
    initial = b0().state_dict()
    torch.save(initial, start)
    train(run_args(tmp_path, "--pretrained-from-file", str(start), "--freeze-until", "1", "--epochs", "1",
                   "--survival_prob", "0.8"))
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    frozen = ("stem.", "layers.0.", "layers.1.")
    for name, value in saved["state_dict"].items():
        if name.startswith(frozen):  # weights, BN affine parameters, running statistics, batch counts
            assert torch.equal(value, initial[name]), name
    for name in ("layers.2.block0.expand.bn.running_mean", "layers.2.block0.expand.conv.weight",
                 "features.bn.running_var", "classifier.fc.weight"):
        assert not torch.equal(saved["state_dict"][name], initial[name]), name
    # The optimizer holds only the trainable parameters.
    model = b0()
    finetune.freeze(model, "1")
    trainable = sum(p.requires_grad for p in model.parameters())
    assert trainable < len(list(model.parameters()))
    assert sum(len(g["params"]) for g in saved["optimizer"]["param_groups"]) == trainable


def test_freeze_points_name_the_models_own_parts():
    model = b0()
    points = finetune.freeze_points(model)
    assert points["stem"] == ["stem"]
    assert points["2"] == points["layers.2"] == points["layers.2.block1"]
    assert points["layers.2.block1"] == ["stem", "layers.0.block0", "layers.1.block0", "layers.1.block1",
                                         "layers.2.block0", "layers.2.block1"]
    assert points["features"][-1] == "features" and len(points["features"]) == B0_BLOCKS + 2
    with pytest.raises(UserError, match=r"^--freeze-until 'layers.9': not a part of efficientnet-b0; valid: stem, "
                                        r"stages 0…6 \(or layers.0…layers.6\), blocks layers.0.block0…layers.6.block0 "
                                        r"\(layers.<stage>.block<k>, in order\), features$"):
        finetune.freeze(model, "layers.9", "efficientnet-b0")
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_modules_return_to_eval_in_a_wrapped_training_model():
    model = b0()
    frozen = finetune.freeze(model, "layers.0")
    wrapped = torch.compile(model)  # names its modules _orig_mod.*, as DDP names them module.*
    wrapped.train()
    finetune.keep_eval(wrapped, frozen)
    assert not model.stem.training and not model.stem.bn.training and not model.layers[0].block0.depsep.bn.training
    assert model.layers[1].training and model.features.bn.training and model.classifier.training


def test_models_without_efficientnets_parts_are_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(UserError, match=r"^--layer-decay needs EfficientNet's stem, layers, features and "
                                        r"classifier; tiny has other modules$"):
        finetune.lr_scales(model, layer_decay=0.5, arch="tiny")
    with pytest.raises(UserError, match=r"^--freeze-until needs"):
        finetune.freeze(model, "stem", "tiny")


# --- the head and the flags -------------------------------------------------------------------------------------

def test_zero_head_for_a_new_classifier_only(tmp_path):
    weights = tmp_path / "b0.pth"
    torch.save(get_entry("efficientnet-b0")(num_classes=10).state_dict(), weights)
    config = parse_config(run_args(tmp_path, "--pretrained-from-file", str(weights), "--reset-classifier",
                                   "--head-init", "zero"))
    model = get_entry("efficientnet-b0")(**config.model.params)
    finetune.prepare(model, config)
    assert not model.classifier.fc.weight.any() and not model.classifier.fc.bias.any()
    assert model.stem.conv.weight.any()
    config = parse_config(run_args(tmp_path, "--head-init", "zero"))  # a fresh model: allowed
    finetune.prepare(model, config)
    with pytest.raises(UserError, match=r"^--head-init zero would discard the classifier of the pretrained weights; "
                                        r"add --reset-classifier to start a new one$"):
        config = parse_config(run_args(tmp_path, "--num_classes", "10", "--pretrained-from-file", str(weights),
                                       "--head-init", "zero"))
        finetune.prepare(get_entry("efficientnet-b0")(**config.model.params), config)


def test_flags_are_in_the_help_and_refused_with_evaluate(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["-h"])
    text = capsys.readouterr().out
    for flag in ("--layer-decay", "--freeze-until", "--head-lr-scale", "--head-init"):
        assert flag in text, flag
    config = parse_config(run_args(tmp_path, "--evaluate", "--layer-decay", "0.5", "--head-init", "zero"))
    with pytest.raises(UserError, match=r"^--layer-decay, --head-init change\(s\) training; not with --evaluate$"):
        finetune.check_flags(config)


def test_quant_main_takes_the_flags_and_refuses_a_zero_quantized_head(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        import quant_main
    finally:
        sys.path.pop(0)
    config = quant_main.parse_config(run_args(tmp_path, "--arch", "efficientnet-quant-b0", "--layer-decay", "0.9",
                                              "--freeze-until", "stem", "--head-init", "zero"))
    model = get_entry(config.model.arch)(**config.model.params)
    scales = finetune.lr_scales(model, layer_decay=0.9)  # every parameter of the quantized model has a depth
    assert scales.keys() == dict(model.named_parameters()).keys() and scales["classifier.fc.weight"] == 1.0
    with pytest.raises(UserError, match=r"^--head-init zero: efficientnet-quant-b0's classifier quantizes its "
                                        r"weights in a range calibrated from them"):
        finetune.prepare(model, config)
