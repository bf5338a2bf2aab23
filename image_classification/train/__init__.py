"""The training loop behind main.py and quant_main.py, one concern per module:

    loop.py        run(config): the job; fit (the epochs) and evaluate (--evaluate)
    setup.py       setup_job: model, loaders, loss, optimizer, features, resume; checked before a file is written
    epoch.py       train_one_epoch and train_step: forward, loss, backward, the (accumulated) optimizer step
    validate.py    validation: loss, top-1/top-k, throughput and latency
    resume.py      --resume: which checkpoint, and restoring it
    job.py         the Job (config, trainer, state, loaders, report, features) and its checkpoints
    state.py       Trainer, RunState, StopRequest
    optimizers.py, schedules.py, losses.py        registries of optimizers and LR schedules; the losses
    ema.py, divergence.py                         training features of the core (features.py)

Device, precision and memory format come from one ExecutionContext; the loop never asks torch.cuda. Optional
techniques (EMA, SWA, distillation, progressive stages, freezing, the divergence guard) plug in as training
features (image_classification/features.py) rather than as branches of the loop.
"""
from .loop import evaluate, fit, run
from .setup import setup_job

__all__ = ["evaluate", "fit", "run", "setup_job"]
