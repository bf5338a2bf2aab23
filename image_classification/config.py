"""The configuration of a main.py / quant_main.py job: built once from the parsed flags, then read-only.

    args = arguments.parse_args(argv)               # argparse: the only place that reads the command line
    config = Config.from_args(args)                 # typed, frozen sections, one per concern
    config.optim.lr, config.data.batch_size, config.swa.swa_start, config.model.num_classes
    shorter = config.replace(epochs=1, workspace="ws2")   # a changed job, checked as the command line is

Each section's fields are the flags' own names (their argparse dests), so `--weight-decay` is
`config.optim.weight_decay` wherever it is read. `config.flags` keeps every main flag in the parser's order (the
report's PARAMETER record, a checkpoint's "args", the YAML a run can be repeated from) and `config.model.params`
the arch's model flags.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    """What the data pipelines read: where, how, and at which sizes."""

    data: str | None
    data_backend: str
    data_format: str
    interpolation: str
    workers: int
    prefetch: int
    image_size: int | None
    eval_image_size: int | None
    eval_crop_pct: float | None
    tta: str
    augmentation: str | None
    randaug_magnitude: int
    batch_size: int
    random_erasing: float = 0.0
    repeated_augment: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, its model flags (`params`, e.g. num_classes, pretrained_from_file) and how it runs."""

    arch: str
    jit: str
    memory_format: str
    sync_bn: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    # Whether the command line gave --num_classes. When it did not, params["num_classes"] is a default (the
    # parser's 1000 or configs.yml's) that the job replaces by the class count of the weights it continues from or
    # of its data (train/checks.py): ImageNet's folders give 1000, a 4-class folder 4.
    num_classes_given: bool = True

    @property
    def num_classes(self) -> int:
        return self.params["num_classes"]


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its step (accumulated to --optimizer-batch-size)."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    bn_weight_decay: bool = False
    nesterov: bool = False
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1e-3
    optimizer_batch_size: int = -1
    adam_betas: tuple[float, float] | None = None
    adam_eps: float | None = None
    clip_grad: float | None = None


@dataclass(frozen=True)
class LossConfig:
    """The training loss and the batch mixing it learns from."""

    label_smoothing: float
    mixup: float
    cutmix: float


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs, the per-epoch LR schedule and the progressive stages."""

    epochs: int
    run_epochs: int
    early_stopping_patience: int
    lr_schedule: str
    end_lr: float
    lr_decay: float
    warmup: int
    n_stages: int
    base_image_size: int | None
    base_mixup: float
    base_cutmix: float
    base_randaug_magnitude: int | None


@dataclass(frozen=True)
class CheckpointConfig:
    """The workspace's checkpoint files and --resume. `prefix` names quant_main.py's (quantized_<name>)."""

    workspace: str
    resume: str | None
    save_checkpoints: bool
    checkpoint_filename: str
    gather_checkpoints: int
    prefix: str = ""

    @property
    def filename(self) -> str:
        """The latest checkpoint's file name in the workspace."""
        return self.prefix + self.checkpoint_filename


@dataclass(frozen=True)
class LogConfig:
    """The report, the log lines and the trackers that receive the report's records."""

    print_freq: int
    raport_file: str
    topk: int
    tensorboard: str | None
    mlflow: str | None          # "" for --mlflow without a URI


@dataclass(frozen=True)
class RuntimeConfig:
    """Device, precision, processes, seed, and what the job does (train, --evaluate, --training-only)."""

    device: str
    amp: bool
    static_loss_scale: float
    tf32: bool
    cpu_allocator: str
    cpu_kernels: str
    dist_backend: str
    gpu_affinity: str
    seed: int | None
    prof: int
    evaluate: bool
    training_only: bool


@dataclass(frozen=True)
class EMAConfig:
    use_ema: float | None


@dataclass(frozen=True)
class SWAConfig:
    swa_start: int | None
    swa_lr: float | None
    swa_anneal_epochs: int


@dataclass(frozen=True)
class DistillationConfig:
    teacher_arch: str | None
    teacher_weights: str | None
    kd_alpha: float | None
    kd_temperature: float | None


@dataclass(frozen=True)
class FinetuneConfig:
    layer_decay: float | None
    freeze_until: str | None
    head_lr_scale: float | None
    head_init: str


@dataclass(frozen=True)
class QuantizationConfig:
    """quant_main.py's calibration flags."""

    skip_calibration: bool
    calibration_batches: int
    calibrator: str
    calibration_percentile: float


# Config's sections: attribute -> dataclass. Every main.py flag belongs to exactly one (checked when built).
SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "optim": OptimizerConfig, "loss": LossConfig, "schedule": ScheduleConfig,
    "checkpoint": CheckpointConfig, "log": LogConfig, "runtime": RuntimeConfig, "ema": EMAConfig, "swa": SWAConfig,
    "distillation": DistillationConfig, "finetune": FinetuneConfig,
}
NOT_FLAGS = {"params", "prefix", "num_classes_given"}  # section fields that no main.py flag sets
# The resolved flags of a run, written to its workspace: `--config <workspace>/config.yaml` repeats the run.
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class Config:
    """A job's configuration: typed sections over the flags (see the module's docstring)."""

    flags: Mapping[str, Any]
    data: DataConfig
    model: ModelConfig
    optim: OptimizerConfig
    loss: LossConfig
    schedule: ScheduleConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    runtime: RuntimeConfig
    ema: EMAConfig
    swa: SWAConfig
    distillation: DistillationConfig
    finetune: FinetuneConfig
    quantization: QuantizationConfig | None = None   # quant_main.py's jobs only

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, checkpoint_prefix: str = "") -> "Config":
        """The config of parsed flags (arguments.parse_args, with quant_main.py's added for a QAT job)."""
        flags = {key: value for key, value in vars(args).items() if key not in ("model_args", "num_classes_given")}
        return cls.from_flags(flags, vars(args.model_args), checkpoint_prefix=checkpoint_prefix,
                              num_classes_given=getattr(args, "num_classes_given", True))

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], model_flags: Mapping[str, Any], *, checkpoint_prefix: str = "",
                   num_classes_given: bool = True) -> "Config":
        """The config of flag values by dest (main.py's, plus quant_main.py's calibration flags for a QAT job);
        `num_classes_given`: whether model_flags' num_classes came from the command line (see ModelConfig)."""
        flags = dict(flags)
        quantization_flags = {f.name for f in fields(QuantizationConfig)}
        quant = quantization_flags <= flags.keys()
        known = {f.name for section in SECTIONS.values() for f in fields(section)} - NOT_FLAGS
        stray = sorted(flags.keys() - known - (quantization_flags if quant else set()))
        if stray:
            raise ValueError(f"flags without a config section: {', '.join(stray)}")
        sections = {name: _section(section, flags) for name, section in SECTIONS.items() if name != "model"}
        sections["model"] = ModelConfig(arch=flags["arch"], jit=flags["jit"], memory_format=flags["memory_format"],
                                        sync_bn=flags["sync_bn"], params=MappingProxyType(dict(model_flags)),
                                        num_classes_given=num_classes_given)
        sections["checkpoint"] = _section(CheckpointConfig, {**flags, "prefix": checkpoint_prefix})
        return cls(flags=MappingProxyType(flags), quantization=_section(QuantizationConfig, flags) if quant else None,
                   **sections)

    def plain(self) -> dict[str, Any]:
        """The flags as plain values (what the report's PARAMETER record and a checkpoint's "args" hold), with the
        model flags as a dict under "model_args"."""
        return {**{key: _plain(value) for key, value in self.flags.items()},
                "model_args": {key: _plain(value) for key, value in self.model.params.items()}}

    def settings(self) -> dict[str, Any]:
        """The flags and the model flags together, by dest, as a --config file holds them: read back with nothing on
        the command line, they give this config again."""
        plain = self.plain()
        return {**plain.pop("model_args"), **plain}

    def replace(self, *, model_params: Mapping[str, Any] | None = None, **flags: Any) -> "Config":
        """This config with some flags (by dest) and model flags changed."""
        unknown = sorted(flags.keys() - self.flags.keys())
        if unknown:
            raise ValueError(f"not main.py flags: {', '.join(unknown)}")
        model_params = dict(model_params or {})
        params = {**self.model.params, **model_params}
        return Config.from_flags({**self.flags, **flags}, params, checkpoint_prefix=self.checkpoint.prefix,
                                 num_classes_given=self.model.num_classes_given or "num_classes" in model_params)


def write_config_file(config: Config, path: str | Path) -> None:
    """The job's settings as YAML at `path`, written atomically, for `--config` to repeat the run."""
    import yaml
    from .atomic import atomic_write_text
    prog = "quant_main.py" if config.quantization is not None else "main.py"
    header = (f"# The flags of a {prog} run, resolved (command line, --config, configs.yml, defaults).\n"
              f"# Repeat it: python {prog} --config {path} [flags that change it, e.g. --workspace]\n")
    atomic_write_text(path, header + yaml.safe_dump(config.settings(), sort_keys=False))


def _section(section: type, flags: Mapping[str, Any]):
    return section(**{f.name: flags[f.name] for f in fields(section) if f.name in flags or f.name not in NOT_FLAGS})


def _plain(value: Any) -> Any:
    """`value` as a JSON-able plain value: numbers, strings, None, lists of those; anything else as its str()."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return str(value)
