"""What the training-parity fixture was computed on: weights, inputs and batches made the same way for the
reference's code (tests/fixtures/make_training_parity_fixtures.py, run once) and for ours
(tests/test_parity_training.py). Plain torch only, so that either codebase can use it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "training_parity.json"

# Stochastic depth masks and train-mode logits: the B family at a tiny resolution.
NUM_CLASSES = 10
IMAGE_SIZE = 32
BATCH = 4
MASK_SEED = 0       # the global seed before the mask forwards
MASK_FORWARDS = 3
LOGITS_SEED = 1     # the global seed before the logits forwards
LOGITS_FORWARDS = 2
WEIGHTS_SEED = 2
INPUT_SEED = 3
# Intra-op threads the fixture was computed with: a convolution's sums are split among the threads, so another
# count rounds differently (the tests pin it; pytest-xdist's workers otherwise run with one thread each).
THREADS = 2

# Accumulation: tests/tiny_model.py's model, batches of 4 accumulated in pairs, epochs of an odd length.
ACC_CLASSES = 5
ACC_BATCH = 4
ACC_STEPS = 2
ACC_EPOCHS = 2
ACC_ITERATIONS = 3     # per epoch: the second optimizer step takes one batch of each epoch
ACC_VAL_BATCHES = 2
ACC_LR = 0.1
ACC_MOMENTUM = 0.9
ACC_WEIGHT_DECAY = 1e-4
ACC_LABEL_SMOOTHING = 0.1


def seeded_weights(state_dict: dict[str, torch.Tensor], seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """Weights for a state dict, drawn in key order from one generator (so the two codebases, whose keys and
    shapes are the same, get the same weights whatever their initialisation): conv and linear weights
    kaiming-scaled, BN scales near 1, biases small; BN running statistics and counters as they are."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state_dict.items():
        if not value.is_floating_point() or ".running_" in name:
            out[name] = value.clone()
            continue
        noise = torch.randn(value.shape, generator=generator)
        if value.dim() > 1:
            out[name] = noise * (2.0 / value[0].numel()) ** 0.5
        elif name.endswith("bn.weight"):
            out[name] = 1.0 + 0.1 * noise
        else:
            out[name] = 0.1 * noise
    return out


def images(seed: int = INPUT_SEED) -> torch.Tensor:
    """The input batch of the logits forwards."""
    return torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(ACC_BATCH, 3, 8, 8, generator=generator),
             torch.randint(0, ACC_CLASSES, (ACC_BATCH,), generator=generator)) for _ in range(count)]


def train_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The accumulation run's training batches of `epoch`: different in every iteration and epoch."""
    return _batches(100 + epoch, ACC_ITERATIONS)


def val_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The accumulation run's validation batches."""
    return _batches(99, ACC_VAL_BATCHES)


def load_fixture() -> dict:
    """tests/fixtures/training_parity.json: what the reference's code computed on the above."""
    return json.loads(FIXTURE.read_text())
