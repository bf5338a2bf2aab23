"""The reference's recipes train the same network: stochastic depth, the survival table, gradient accumulation
across epochs and the reported losses, against tests/fixtures/training_parity.json (computed once from the
reference's own code by tests/fixtures/make_training_parity_fixtures.py; inputs from tests/parity.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import parity
import tiny_model
from image_classification import models
from image_classification.data import Loader
from image_classification.models import fused, get_entry
from image_classification.models.common import StochasticDepthResidual
from image_classification.train import checks
from reports import by_step, epoch_summaries, read_report
from runs import train

FIXTURE = parity.load_fixture()


@pytest.fixture(autouse=True)
def _fixture_threads():
    """Every comparison here runs with the fixture's thread count (parity.THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(parity.THREADS)
    yield
    torch.set_num_threads(threads)


# --- stochastic depth --------------------------------------------------------------------------------------------

def seeded(arch: str) -> torch.nn.Module:
    """`arch` with parity's weights, in train mode."""
    model = get_entry(arch)(num_classes=parity.NUM_CLASSES)
    model.load_state_dict(parity.seeded_weights(model.state_dict()))
    return model.train()


def test_b4_draws_the_references_masks_block_for_block():
    expected = FIXTURE["stochastic_depth"]
    model = get_entry(expected["arch"])(num_classes=parity.NUM_CLASSES).train()
    residual_adds = {name.rsplit(".", 1)[0]: m for name, m in model.named_modules()
                     if isinstance(m, StochasticDepthResidual) and m.survival_prob < 1.0}
    assert list(residual_adds) == expected["blocks"]
    assert [m.survival_prob for m in residual_adds.values()] == expected["survival_prob"]
    drawn: list[float] = []

    def record(module, inputs, output):
        # Dropped: the block's output is its input. Kept: exactly the reference's addcmul with its mask value.
        residual, branch = inputs
        if torch.equal(output, residual):
            drawn.append(0.0)
        else:
            mask = expected["masks"][len(masks)][len(drawn)]
            assert torch.equal(output, torch.addcmul(residual, torch.tensor(mask), branch))
            drawn.append(mask)
    for module in residual_adds.values():
        module.register_forward_hook(record)
    masks: list[list[float]] = []
    torch.manual_seed(parity.MASK_SEED)
    with torch.no_grad():
        for _ in range(parity.MASK_FORWARDS):
            model(parity.images())
            masks.append(drawn)
            drawn = []
    assert masks == expected["masks"]
    assert any(0.0 in forward for forward in masks)  # the seed drops some blocks


@pytest.mark.parametrize("arch", ["efficientnet-b0", "efficientnet-b4"])
def test_train_mode_logits_equal_the_references(arch):
    # ATen's layers, as the reference: the fused CPU kernels (models/fused.py) round differently (~1e-5 here).
    fused.set_enabled(False)
    try:
        model = seeded(arch)
        torch.manual_seed(parity.LOGITS_SEED)
        for expected in FIXTURE["logits"][arch]:
            assert torch.equal(model(parity.images()).detach(), torch.tensor(expected))
    finally:
        fused.set_enabled(True)


def test_sample_mode_draws_differently_and_eval_ignores_the_mode():
    batch, sample = seeded("efficientnet-b4"), get_entry("efficientnet-b4")(num_classes=parity.NUM_CLASSES,
                                                                           stochastic_depth_mode="sample")
    sample.load_state_dict(batch.state_dict())
    sample.train()
    outputs = []
    for model in (batch, sample):
        torch.manual_seed(parity.LOGITS_SEED)
        outputs.append(model(parity.images()).detach())
    assert not torch.equal(*outputs)
    sample.load_state_dict(batch.state_dict())  # the same BN statistics after their different train forwards
    with torch.no_grad():
        assert torch.equal(batch.eval()(parity.images()), sample.eval()(parity.images()))
    assert get_entry("efficientnet-b4").parser().parse_args(
        ["--stochastic-depth-mode", "sample"]).stochastic_depth_mode == "sample"


@pytest.mark.parametrize("family", ["efficientnet", "efficientnet-widese", "efficientnet-quant"])
def test_survival_defaults_are_the_references_table(family):
    """Only b4 trains with stochastic depth in the reference's table; --survival_prob 0.8 is the flag for others."""
    defaults = {member: get_entry(f"{family}-{member}").parser().parse_args([]).survival_prob
                for member in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7")}
    assert defaults == {"b0": 1.0, "b1": 1.0, "b2": 1.0, "b3": 1.0, "b4": 0.8, "b5": 1.0, "b6": 1.0, "b7": 1.0}
    assert get_entry(f"{family}-b5").parser().parse_args(["--survival_prob", "0.8"]).survival_prob == 0.8


# --- gradient accumulation and the reported losses -------------------------------------------------------------

class ListLoader(Loader):
    """Fixed batches per epoch (a function of the epoch), skipping as a resumed loader must."""

    def __init__(self, batches_of, ctx):
        super().__init__(classes=[str(i) for i in range(parity.ACC_CLASSES)], batch_size=parity.ACC_BATCH,
                         num_samples=len(batches_of(0)) * parity.ACC_BATCH, drop_last=True, ctx=ctx)
        self.batches_of = batches_of

    def _iterate(self, epoch, skip_batches):
        for batch in self.batches_of(epoch)[skip_batches:]:
            yield batch, 0


@pytest.fixture
def parity_data(monkeypatch):
    """main.py trains tests/tiny_model.py on parity's batches; returns a setter for the train batches."""
    import image_classification.data as data
    monkeypatch.setitem(models._REGISTRY, tiny_model.NAME, tiny_model.TinyEntry())
    # The batches stand in for a dataset, so its classes do too (train/checks.py reads them for --num_classes).
    monkeypatch.setattr(checks, "dataset_class_names", lambda *args: [str(c) for c in range(parity.ACC_CLASSES)])
    train_batches = {"of": parity.train_batches}
    monkeypatch.setattr(data, "build_train_loader",
                        lambda backend, d, *, ctx, **kw: ListLoader(train_batches["of"], ctx))
    monkeypatch.setattr(data, "build_val_loader",
                        lambda backend, d, *, ctx, **kw: ListLoader(lambda epoch: parity.val_batches(), ctx))
    return train_batches


def accumulation_args(workspace: Path, *extra: str) -> list[str]:
    """The fixture's run as main.py flags: sgd, constant LR (the step schedule's first 30 epochs)."""
    return ["unused", "--arch", tiny_model.NAME, "--num_classes", str(parity.ACC_CLASSES), "-b", str(parity.ACC_BATCH),
            "--optimizer-batch-size", str(parity.ACC_BATCH * parity.ACC_STEPS), "--epochs", str(parity.ACC_EPOCHS),
            "--lr", str(parity.ACC_LR), "--momentum", str(parity.ACC_MOMENTUM), "--wd", str(parity.ACC_WEIGHT_DECAY),
            "--label-smoothing", str(parity.ACC_LABEL_SMOOTHING), "--print-freq", "1", "--seed", "0",
            "--device", "cpu", "-j", "0", "--workspace", str(workspace), *extra]


def weights(workspace: Path) -> dict[str, torch.Tensor]:
    return torch.load(workspace / "checkpoint.pth.tar", weights_only=True)["state_dict"]


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_accumulation_across_the_epoch_boundary_trains_as_the_references_trainer(parity_data, tmp_path):
    expected = FIXTURE["accumulation"]
    train(accumulation_args(tmp_path))
    assert_equal_weights(weights(tmp_path), {k: torch.tensor(v) for k, v in expected["state_dict"].items()})
    records = read_report(tmp_path / "experiment_raport.json")
    # train.loss: each iteration's loss divided by the accumulation; val.loss: the label-smoothed loss.
    iterations = sorted((step, data) for step, data in by_step(records).items()
                        if len(step) == 2 and isinstance(step[0], int))  # not ["Per class", epoch]
    logged = [data["train.loss"] for step, data in iterations if "train.loss" in data]
    assert logged == [loss for epoch in expected["train_loss"] for loss in epoch]
    epochs = epoch_summaries(records)
    assert [epochs[e]["val.loss"] for e in range(parity.ACC_EPOCHS)] == pytest.approx(expected["val_loss"], rel=1e-9)


@pytest.mark.slow
def test_accumulation_across_epochs_equals_one_epoch_of_the_same_iterations(parity_data, tmp_path):
    train(accumulation_args(tmp_path / "two"))
    parity_data["of"] = lambda epoch: parity.train_batches(0) + parity.train_batches(1)
    train(accumulation_args(tmp_path / "one", "--epochs", "1"))
    assert_equal_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))


@pytest.mark.slow
def test_an_epoch_end_checkpoint_between_two_halves_resumes_exactly(parity_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(accumulation_args(full))
    train(accumulation_args(split, "--run-epochs", "1"))
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["accumulated_iterations"], saved["accumulation"]) == (1, 1, parity.ACC_STEPS)
    assert saved["gradients"].keys() == saved["state_dict"].keys()  # the half-accumulated step's
    train(accumulation_args(split, "--resume", str(split / "checkpoint.pth.tar")))
    assert_equal_weights(weights(full), weights(split))


@pytest.mark.slow
def test_a_signal_between_two_halves_saves_their_gradients_and_resumes_exactly(parity_data, tmp_path, monkeypatch):
    from runs import float_tensors, stop_at_iteration
    full, split = tmp_path / "full", tmp_path / "split"
    train(accumulation_args(full))
    with monkeypatch.context() as patch:
        stop_at_iteration(patch, parity.ACC_ITERATIONS + 2)  # epoch 1's second batch: the first half of a step
        assert train(accumulation_args(split))["interrupted"]
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert (saved["epoch"], saved["iteration"], saved["accumulated_iterations"]) == (1, 2, 1)
    assert saved["gradients"]
    train(accumulation_args(split, "--resume", str(split / "checkpoint.pth.tar")))
    expected, resumed = float_tensors(full / "checkpoint.pth.tar"), float_tensors(split / "checkpoint.pth.tar")
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.slow
def test_a_resume_that_accumulates_differently_drops_the_half_step_and_says_so(parity_data, tmp_path, capsys):
    train(accumulation_args(tmp_path, "--run-epochs", "1"))
    summary = train(accumulation_args(tmp_path, "--optimizer-batch-size", str(3 * parity.ACC_BATCH), "--resume",
                                      str(tmp_path / "checkpoint.pth.tar")))
    assert summary["epoch"] == parity.ACC_EPOCHS
    assert "the checkpoint stopped 1 of 2 iterations into an accumulated step, on 1 processes; this run " \
           "accumulates 3 on 1, so those gradients are dropped" in capsys.readouterr().out


@pytest.mark.slow
def test_a_b0_run_resumed_between_two_halves_equals_the_uninterrupted_run(tmp_path):
    """The real network (BN, dropout, stochastic depth, mixup, EMA) with --prof 3 and accumulation 2."""
    from runs import float_tensors, run_args
    extra = ("--optimizer-batch-size", "8", "--survival_prob", "0.8", "--mixup", "0.2", "--use-ema", "0.9")
    full, split = tmp_path / "full", tmp_path / "split"
    train(run_args(full, *extra))
    train(run_args(split, *extra, "--run-epochs", "1"))
    assert torch.load(split / "checkpoint.pth.tar", weights_only=True)["accumulated_iterations"] == 1
    train(run_args(split, *extra, "--resume", str(split / "checkpoint.pth.tar")))
    expected, resumed = float_tensors(full / "checkpoint.pth.tar"), float_tensors(split / "checkpoint.pth.tar")
    for name, value in expected.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.slow
def test_two_gloo_processes_resume_between_two_halves_with_each_ranks_gradients(tmp_path):
    from test_multiproc import _run
    # 64 samples over 2 ranks of batch 4, cut to 5 iterations an epoch, accumulating 2: the epoch ends mid-step.
    flags = ("--dist-backend", "gloo", "--prof", "5", "--optimizer-batch-size", "16")
    full = _run(tmp_path, "full", 2, 4, *flags)
    split = _run(tmp_path, "split", 2, 4, *flags, "--run-epochs", "1")
    saved = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert saved["accumulated_iterations"] == 1 and len(saved["gradients"]) == 2
    rank0, rank1 = saved["gradients"]
    assert not all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # each rank's own batch, not synced
    _run(tmp_path, "split", 2, 4, *flags, "--resume", str(split / "checkpoint.pth.tar"))
    a, b = (torch.load(w / "checkpoint.pth.tar", weights_only=True) for w in (full, split))
    assert_equal_weights(a["state_dict"], b["state_dict"])
    for index, values in a["optimizer"]["state"].items():
        for key, value in values.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
