"""Training options beyond the reference: --optimizer adamw and lamb, --clip-grad, --sync-bn, --random-erasing,
--repeated-augment, and --topk capped by the class count. Each is checked against what it is documented to do."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn
from torchvision import transforms as T

from image_classification.arguments import parse_config
from image_classification.cli import UserError
from image_classification.config import OptimizerConfig
from image_classification.context import create_context
from image_classification.data import build_train_loader
from image_classification.data.erasing import RandomErasing
from image_classification.data.folder import repeated_samples
from image_classification.train.epoch import train_step
from image_classification.train.lamb import Lamb
from image_classification.train.losses import TrainingLoss
from image_classification.train.optimizers import optimizer_of
from image_classification.train.setup import setup_job
from image_classification.train.state import Trainer
from image_classification.train.validate import EvalOptions

CPU = create_context(device="cpu")
SIZE = 32


def _flags(data, workspace, *extra: str) -> list[str]:
    return [str(data), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", str(SIZE), "-b", "4",
            "--workers", "0", "--epochs", "2", "--workspace", str(workspace), *extra]


def _setup(argv: list[str]):
    """The job main.py would run for `argv`, set up and closed again (nothing trained)."""
    config = parse_config(argv)
    with create_context(device="cpu") as ctx:
        job = setup_job(config, ctx)
        job.__exit__()
    return job


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


# --- optimizers -------------------------------------------------------------------------------------------------

def _settings(name: str, **kwargs) -> OptimizerConfig:
    return OptimizerConfig(optimizer=name, lr=0.01, momentum=0.9, weight_decay=0.1, **kwargs)


def test_adamw_is_torchs_with_the_flags_betas_and_eps_and_no_decay_for_batchnorm():
    torch.manual_seed(0)
    model = _Net()
    optimizer = optimizer_of(model, _settings("adamw", adam_betas=[0.8, 0.99], adam_eps=1e-5))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups] == \
        [(0.0, (0.8, 0.99), 1e-5), (0.1, (0.8, 0.99), 1e-5)]
    # One step by hand: decoupled decay, then m/(sqrt(v)+eps) with bias correction (m^ = g, v^ = g^2 at step 1).
    weight = model.fc.weight
    before, grad = weight.detach().clone(), torch.randn_like(weight)
    weight.grad = grad.clone()
    optimizer.step()
    expected = before * (1 - 0.01 * 0.1) - 0.01 * grad / (grad.abs() + 1e-5)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert optimizer_of(_Net(), _settings("adamw")).param_groups[0]["eps"] == 1e-8  # torch's default


def test_lamb_step_by_hand():
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))          # norm 5
    bias = nn.Parameter(torch.tensor([1.0, -1.0]))           # no weight decay: no trust ratio
    optimizer = Lamb([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
                     lr=0.01, eps=1e-6)
    weight.grad, bias.grad = torch.tensor([1.0, 2.0]), torch.tensor([-0.5, 0.25])
    optimizer.step()
    # Step 1: the bias-corrected moments are g and g^2, so Adam's update is g / (|g| + eps).
    adam = torch.tensor([1.0, 2.0]) / (torch.tensor([1.0, 2.0]) + 1e-6)
    update = adam + 0.1 * torch.tensor([3.0, 4.0])
    trust = 5.0 / update.norm()
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 4.0]) - 0.01 * trust * update)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0, -1.0]) - 0.01 * torch.tensor([-0.5, 0.25])
                               / (torch.tensor([0.5, 0.25]) + 1e-6))


def test_lamb_equals_timms_lamb_without_its_built_in_clipping():
    timm_optim = pytest.importorskip("timm.optim")
    torch.manual_seed(0)
    ours, theirs = _Net(), _Net()
    theirs.load_state_dict(ours.state_dict())
    settings = _settings("lamb", adam_betas=[0.9, 0.98])
    optimizer = optimizer_of(ours, settings)
    assert isinstance(optimizer, Lamb) and optimizer.param_groups[0]["eps"] == 1e-6
    groups = [{"params": [p for n, p in theirs.named_parameters() if "bn" in n], "weight_decay": 0.0},
              {"params": [p for n, p in theirs.named_parameters() if "bn" not in n], "weight_decay": 0.1}]
    reference = timm_optim.Lamb(groups, lr=0.01, betas=(0.9, 0.98), eps=1e-6, max_grad_norm=None)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_optimizer_flags_of_other_optimizers_are_refused():
    with pytest.raises(UserError, match=r"^--adam-eps apply to --optimizer adamw and lamb, not sgd$"):
        optimizer_of(_Net(), _settings("sgd", adam_eps=1e-6))
    with pytest.raises(UserError, match=r"^--adam-betas apply to --optimizer adamw and lamb, not rmsprop$"):
        optimizer_of(_Net(), _settings("rmsprop", adam_betas=[0.9, 0.9]))
    with pytest.raises(UserError, match=r"^--nesterov applies to --optimizer sgd only$"):
        optimizer_of(_Net(), _settings("lamb", nesterov=True))


def test_optimizer_choices_and_flags_parse():
    config = parse_config(["/d", "--optimizer", "lamb", "--adam-betas", "0.9", "0.95", "--adam-eps", "1e-7",
                           "--clip-grad", "2.5"])
    assert (config.optim.optimizer, config.optim.adam_betas, config.optim.adam_eps, config.optim.clip_grad) == \
        ("lamb", [0.9, 0.95], 1e-7, 2.5)
    with pytest.raises(SystemExit):
        parse_config(["/d", "--adam-betas", "0.9", "1.5"])


# --- gradient clipping -----------------------------------------------------------------------------------------

def _trainer(clip: float | None, accumulation: int = 1) -> Trainer:
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # a step moves the weights by exactly the gradient
    return Trainer(ctx=CPU, model=model, train_model=model, loss=TrainingLoss(nn.CrossEntropyLoss()),
                   scaler=CPU.grad_scaler(), optimizer=optimizer, accumulation=accumulation, clip_grad=clip)


def _moved(trainer: Trainer, steps: list[bool]) -> float:
    """The norm of what the weights moved over train_step calls (True: the accumulation's optimizer step)."""
    before = [p.detach().clone() for p in trainer.model.parameters()]
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 50
    target = torch.tensor([0, 1, 2, 0])
    for optimizer_step in steps:
        train_step(trainer, images, target, optimizer_step)
    return math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in zip(trainer.model.parameters(), before)))


def test_clip_grad_bounds_the_global_norm_of_a_step():
    assert _moved(_trainer(None), [True]) > 0.4  # this batch's gradient is larger than the bound
    assert _moved(_trainer(0.1), [True]) == pytest.approx(0.1, rel=1e-5)


def test_clip_grad_with_accumulation_clips_the_accumulated_gradient_at_the_optimizer_step_only():
    unclipped = _trainer(None, accumulation=2)
    _moved(unclipped, [False])
    accumulated = math.sqrt(sum(float(p.grad.square().sum()) for p in unclipped.model.parameters()))
    clipped = _trainer(0.1, accumulation=2)
    assert _moved(clipped, [False]) == 0.0  # no step yet, and the gradients so far are left alone
    assert math.sqrt(sum(float(p.grad.square().sum()) for p in clipped.model.parameters())) == \
        pytest.approx(accumulated)
    assert accumulated > 0.1 and _moved(clipped, [True]) == pytest.approx(0.1, rel=1e-5)


def test_clip_grad_reaches_the_trainer(generated, tmp_path):
    job = _setup(_flags(generated, tmp_path, "--clip-grad", "1.5", "--random-erasing", "0.25"))
    assert job.trainer.clip_grad == 1.5 and job.trainer.erasing.p == 0.25
    job = _setup(_flags(generated, tmp_path))
    assert job.trainer.clip_grad is None and job.trainer.erasing is None


# --- SyncBatchNorm ---------------------------------------------------------------------------------------------

def test_sync_bn_is_refused_on_the_cpu_in_one_line(generated, tmp_path):
    with pytest.raises(UserError) as err:
        _setup(_flags(generated, tmp_path, "--sync-bn", "--device", "cpu"))
    assert str(err.value) == ("--sync-bn: torch.nn.SyncBatchNorm runs on CUDA GPUs only, this run is on cpu (BatchNorm "
                              "in one process already sees its whole batch); drop --sync-bn")


# --- random erasing --------------------------------------------------------------------------------------------

def test_random_erasing_changes_pixels_with_probability_p():
    for p in (0.0, 0.3, 1.0):
        torch.manual_seed(0)
        images = torch.ones(2000, 3, 16, 16)
        RandomErasing(p)(images)
        erased = (images == 0).flatten(1).any(dim=1).float().mean().item()
        assert erased == pytest.approx(p, abs=0.03), p
        # An erased image is 0 inside one rectangle (the normalised mean colour) and untouched outside it.
        assert set(images.unique().tolist()) <= {0.0, 1.0}


def test_random_erasing_draws_as_torchvisions_random_erasing_per_image():
    images = torch.randn(64, 3, 24, 20)
    expected = images.clone()
    torch.manual_seed(3)
    RandomErasing(0.5)(images)
    torch.manual_seed(3)
    transform = T.RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    for i in range(len(expected)):
        expected[i] = transform(expected[i])
    assert torch.equal(images, expected)


# --- repeated augmentation -------------------------------------------------------------------------------------

def test_repeated_augmentation_reads_each_image_n_times_on_different_processes():
    n, repeats = 24, 3
    for world in (1, 2, 3):
        ranks = [repeated_samples(n, epoch=5, seed=1, rank=r, world_size=world, repeats=repeats)
                 for r in range(world)]
        assert all(len(samples) == n // world for samples in ranks)  # an epoch keeps its length
        everything = Counter(index for samples in ranks for index, _ in samples)
        assert len(everything) == n // repeats and set(everything.values()) == {repeats}
        assert all(sorted(r for i, r in sum(ranks, []) if i == index) == [0, 1, 2] for index in everything)
        if world == repeats:  # each rank sees each chosen image once
            assert all(len({i for i, _ in samples}) == len(samples) for samples in ranks)
    other = repeated_samples(n, epoch=6, seed=1, rank=0, world_size=1, repeats=repeats)
    assert {i for i, _ in other} != {i for i, _ in repeated_samples(n, epoch=5, seed=1, rank=0, world_size=1,
                                                                      repeats=repeats)}


def _batches(loader, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, skip_batches=skip)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_repeated_augmentation_augments_each_repeat_differently_and_resumes_exactly(generated):
    loader = build_train_loader("pytorch", str(generated), image_size=16, batch_size=3, ctx=CPU, num_classes=3,
                                workers=0, seed=0, repeated_augment=3)
    epoch = _batches(loader, 1)
    assert len(epoch) == 24 // 3
    # With one process an image's three repeats come in a row: one batch, one label, three augmentations.
    for images, labels in epoch:
        assert len(set(labels.tolist())) == 1
        assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    # A mid-epoch resume starts the same order at the next batch.
    resumed = _batches(loader, 1, skip=5)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(resumed, epoch[5:]))
    assert len(resumed) == len(epoch) - 5
    plain = build_train_loader("pytorch", str(generated), image_size=16, batch_size=3, ctx=CPU, num_classes=3,
                               workers=0, seed=0)
    assert len(_batches(plain, 1)) == len(epoch)


def test_repeated_augmentation_needs_a_dataset():
    with pytest.raises(UserError, match="--repeated-augment repeats the images of a dataset; --data-backend "
                                        "synthetic has none"):
        build_train_loader("synthetic", None, image_size=8, batch_size=2, ctx=CPU, repeated_augment=2)


# --- top-k -----------------------------------------------------------------------------------------------------

def test_topk_is_capped_by_the_class_count_with_a_note(generated, tmp_path, capsys):
    job = _setup(_flags(generated, tmp_path))
    assert EvalOptions.from_config(job.config).topk == 3
    assert ("=> --topk 5 with 3 classes: val.top5 counts the top 3, every class, so it is 100 % by definition; "
            "--topk 2 or lower measures something") in capsys.readouterr().out.splitlines()
    job = _setup(_flags(generated, tmp_path, "--topk", "2"))
    assert EvalOptions.from_config(job.config).topk == 2 and "--topk" not in capsys.readouterr().out
