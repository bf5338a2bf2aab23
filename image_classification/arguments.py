"""main.py's command line: the reference's flags (names, defaults, dests), then the chosen arch's model flags.

Parsing happens in two passes, as in the reference: the main flags first (unknown ones are kept aside),
then the leftovers against `get_entry(args.arch).parser()`. Whatever is still left is an error that
lists every valid flag.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import gpu_affinity
from .cli import ArgumentParser, Number, UserError, check_numbers
from .config import Config
from .config_file import NOT_SETTINGS, ConfigFileError, read_config_file, settings_to_values
from .context import CPU_ALLOCATORS, DIST_BACKENDS
from .data import AUGMENTATIONS, BACKENDS, DATA_FORMATS, INTERPOLATIONS
from .models import available_models, fused, get_entry
from .toolkit import distillation, finetune
from .toolkit.progressive import RANDAUG_MAX_MAGNITUDE
from .toolkit.tta import TTA_MODES
from .train.optimizers import OPTIMIZERS
from .train.schedules import LR_SCHEDULES

# The reference defaults to resnet50, a ConvNets model this EfficientNet suite does not have; its first
# EfficientNet takes that place so that a reference command line without --arch still runs.
DEFAULT_ARCH = "efficientnet-b0"

DESCRIPTION = """Train or evaluate an image classifier (NVIDIA ConvNets main.py flags).

  python main.py /imagenet --arch efficientnet-b0 --epochs 400 -b 256 --amp          # one process
  python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...  # one per GPU
  torchrun --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...             # the same

On a machine without a GPU the same command lines run on CPU (--amp then means bf16 autocast)."""


def _arch(name: str) -> str:
    # Validated after parsing so the error lists the registry and -h still works with a bad --arch.
    return name


def build_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    """The main flags of spec §1 plus this suite's additions (--device, --no-tf32, --jit compile, ...)."""
    p = ArgumentParser(prog=prog, description=DESCRIPTION, add_help=False, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help="show this help (main and model flags) and exit")
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset folder with train/<class>/* and val/<class>/*, or with the tar shards of "
                        "python -m image_classification.data.shards (not needed with --data-backend synthetic)")

    g = p.add_argument_group("data")
    g.add_argument("--data-backend", default="dali-cpu", choices=BACKENDS,
                   help="input pipeline (default: %(default)s)")
    g.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                   help="how DIR holds the images: folder (train/<class>/*, val/<class>/*), shards (WebDataset "
                        "<split>-NNNNNN.tar with index.json), auto: folder when DIR has train/ or val/, else "
                        "shards (not in the reference) (default: %(default)s)")
    g.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                   help="resize interpolation of the data pipeline (default: the arch's: %(default)s for B0-B7, "
                        "bicubic for efficientnet-lite*)")
    g.add_argument("-j", "--workers", type=Number(int, low=0), default=5, metavar="N",
                   help="data loading workers per process (default: %(default)s)")
    g.add_argument("--prefetch", type=Number(int, low=1), default=2, metavar="N",
                   help="batches prefetched per worker (default: %(default)s)")
    g.add_argument("--image-size", type=Number(int, low=1), default=None, metavar="N",
                   help="training image size (of the last stage with --n-stages), also the validation size unless "
                        "--eval-image-size says otherwise (default: the arch's own training size)")
    g.add_argument("--eval-image-size", type=Number(int, low=1), default=None, metavar="N",
                   help="validation image size (not in the reference) (default: --image-size when given, else the "
                        "arch's evaluation size: 384 for efficientnet-v2-s, the training size for B0-B7)")
    g.add_argument("--eval-crop-pct", type=Number(float, low=0, high=1, low_open=True), default=None, metavar="P",
                   help="validation crop fraction: the short side is resized to round(S/P) before the centre crop of "
                        "S = --eval-image-size; with --eval-image-size the FixRes knob (not in the reference) "
                        "(default: the reference's resize to S+32)")
    g.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation of every validation: flip averages the softmax of each image and of "
                        "its horizontal mirror (not in the reference) (default: %(default)s)")
    g.add_argument("--augmentation", type=str, default=None, choices=AUGMENTATIONS,
                   help="extra training augmentation: autoaugment (the reference's: TensorFlow EfficientNet's "
                        "policy_v0, on every backend), autoaugment-paper (torchvision's AutoAugment ImageNet policy, "
                        "pytorch backend only), randaugment (2 operations of --randaug-magnitude), trivialaugment "
                        "(the last three not in the reference) (default: none)")
    g.add_argument("--randaug-magnitude", type=Number(int, low=0, high=RANDAUG_MAX_MAGNITUDE), default=9,
                   metavar="M",
                   help=f"RandAugment magnitude with --augmentation randaugment, 0-{RANDAUG_MAX_MAGNITUDE} on "
                        f"the scale of torchvision and DALI ({RANDAUG_MAX_MAGNITUDE + 1} bins; TF/timm magnitude m "
                        "is about 3m here); of the last stage with --n-stages (default: %(default)s)")
    g.add_argument("--random-erasing", type=Number(float, low=0, high=1), default=0.0, metavar="P",
                   help="erase a random rectangle of each training image with probability P: torchvision's "
                        "RandomErasing (2-33%% of the area, aspect 0.3-3.3, value 0) on the normalised batch, on "
                        "every backend; 0 disables (not in the reference) (default: %(default)s)")
    g.add_argument("--repeated-augment", type=Number(int, low=1), default=1, metavar="N",
                   help="repeated augmentation (DeiT's RASampler): each epoch reads a 1/N of the training images N "
                        "times each, differently augmented and dealt to different processes; an epoch keeps its "
                        "number of images; 1 disables (not in the reference) (default: %(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("-a", "--arch", type=_arch, default=DEFAULT_ARCH, metavar="ARCH",
                   help="model architecture, one of: " + ", ".join(sorted(available_models()))
                        + " (default: %(default)s; the reference's default, resnet50, is not an EfficientNet and "
                          "not in this suite)")
    g.add_argument("--sync-bn", action="store_true",
                   help="synchronise BatchNorm statistics over the processes of a multi-GPU run "
                        "(torch.nn.SyncBatchNorm; CUDA only) (not in the reference)")
    g.add_argument("--jit", default="no", choices=("no", "script", "compile"),
                   help="compile the model: torch.jit.script (script) or torch.compile (compile; on CPU it needs "
                        "a C++ compiler; with --evaluate the weights are also frozen into the compiled graph) "
                        "(default: %(default)s)")
    g.add_argument("--memory-format", default="nchw", choices=("nchw", "nhwc"),
                   help="tensor layout; nhwc is channels_last, faster with AMP on tensor cores "
                        "(default: %(default)s)")

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=Number(int, low=1), default=90, metavar="N",
                   help="total epochs of the run (default: %(default)s)")
    g.add_argument("--run-epochs", type=Number(int, low=1, off=-1), default=-1, metavar="N",
                   help="run at most N epochs in this invocation, then save and exit (-1: all) (default: %(default)s)")
    g.add_argument("--early-stopping-patience", type=Number(int, low=1, off=-1), default=-1, metavar="N",
                   help="stop after N epochs without a better val top-1 (-1: never) (default: %(default)s)")
    g.add_argument("-b", "--batch-size", type=Number(int, low=1), default=256, metavar="N",
                   help="batch size per process (GPU) (default: %(default)s)")
    g.add_argument("--optimizer-batch-size", type=Number(int, low=1, off=-1), default=-1, metavar="N",
                   help="global batch per optimizer step, reached by gradient accumulation; must be a multiple "
                        "of world size x batch size (-1: no accumulation) (default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", "--learning-rate", type=Number(float, low=0), default=0.1, metavar="LR",
                   help="base learning rate (default: %(default)s)")
    g.add_argument("--lr-schedule", default="step", choices=LR_SCHEDULES.names(),
                   help="per-epoch LR schedule after warmup: step (x0.1 at 30, 60, 80), linear (to 0), cosine "
                        "(to --end-lr), exponential (x --lr-decay every epoch) (default: %(default)s)")
    g.add_argument("--end-lr", type=Number(float, low=0), default=0.0, metavar="LR",
                   help="final LR of the cosine schedule (default: %(default)s)")
    g.add_argument("--lr-decay", type=Number(float, low=0, high=1, low_open=True), default=0.97, metavar="GAMMA",
                   help="per-epoch factor of --lr-schedule exponential (not in the reference) (default: %(default)s)")
    g.add_argument("--warmup", type=Number(int, low=0), default=0, metavar="E",
                   help="linear LR warmup epochs (default: %(default)s)")
    g.add_argument("--label-smoothing", type=Number(float, low=0, high=1, high_open=True), default=0.0, metavar="S",
                   help="label smoothing (default: %(default)s)")
    g.add_argument("--mixup", type=Number(float, low=0), default=0.0, metavar="ALPHA",
                   help="mixup alpha (of the last stage with --n-stages), 0 disables (default: %(default)s)")
    g.add_argument("--cutmix", type=Number(float, low=0), default=0.0, metavar="ALPHA",
                   help="CutMix alpha (of the last stage with --n-stages), 0 disables; with --mixup too, each batch "
                        "uses one of the two, chosen with probability 0.5 (not in the reference) "
                        "(default: %(default)s)")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS.names(),
                   help="optimizer: sgd, rmsprop (the reference's), adamw (decoupled weight decay), lamb (layer-wise "
                        "trust ratio for large batches, You et al. 2019) (the last two not in the reference) "
                        "(default: %(default)s)")
    g.add_argument("--momentum", type=Number(float, low=0, high=1, high_open=True), default=0.9, metavar="M",
                   help="momentum (default: %(default)s)")
    g.add_argument("--weight-decay", "--wd", type=Number(float, low=0), default=1e-4, metavar="W",
                   help="weight decay (default: %(default)s)")
    g.add_argument("--bn-weight-decay", action="store_true",
                   help="apply weight decay to BatchNorm parameters too (default: they get 0)")
    g.add_argument("--rmsprop-alpha", type=Number(float, low=0, high=1, high_open=True), default=0.9, metavar="A",
                   help="RMSprop smoothing constant (default: %(default)s)")
    g.add_argument("--rmsprop-eps", type=Number(float, low=0, low_open=True), default=1e-3, metavar="EPS",
                   help="RMSprop epsilon (default: %(default)s)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD only)")
    g.add_argument("--adam-betas", type=Number(float, low=0, high=1, high_open=True), nargs=2, default=None,
                   metavar=("B1", "B2"),
                   help="--optimizer adamw and lamb: the moving-average factors of the gradient and of its square "
                        "(not in the reference) (default: 0.9 0.999)")
    g.add_argument("--adam-eps", type=Number(float, low=0, low_open=True), default=None, metavar="EPS",
                   help="--optimizer adamw and lamb: the term added to the denominator (not in the reference) "
                        "(default: 1e-8 for adamw, as torch's AdamW; 1e-6 for lamb, as timm's and NVIDIA's)")
    g.add_argument("--clip-grad", type=Number(float, low=0, low_open=True), default=None, metavar="NORM",
                   help="clip the global gradient norm to NORM before each optimizer step (after the fp16 loss scale "
                        "is taken out; with --optimizer-batch-size, the accumulated gradient) (not in the reference) "
                        "(default: off)")
    g.add_argument("--use-ema", type=Number(float, low=0, high=1, low_open=True, high_open=True), default=None,
                   metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay, validated as val_ema "
                        "(default: off)")
    g.add_argument("--swa-start", type=Number(int, low=0), default=None, metavar="EPOCH",
                   help="stochastic weight averaging: from this epoch (counted from 0) on, average the weights at "
                        "the end of every epoch with the LR annealed to --swa-lr; at the end of the run the average "
                        "gets fresh BN statistics, is validated as swa.* and saved as model_swa.pth.tar (not in the "
                        "reference) (default: off)")
    g.add_argument("--swa-lr", type=Number(float, low=0, low_open=True), default=None, metavar="LR",
                   help="learning rate of the averaging epochs, needed with --swa-start (default: none)")
    g.add_argument("--swa-anneal-epochs", type=Number(int, low=0), default=10, metavar="N",
                   help="epochs over which the LR goes from the schedule's to --swa-lr by cosine annealing (0: at "
                        "once) (default: %(default)s)")

    g = p.add_argument_group(
        "progressive training (EfficientNetV2; not in the reference)",
        "--n-stages N splits --epochs into N equal stages; from the first stage to the last, the training image "
        "size, mixup alpha, CutMix alpha and RandAugment magnitude go linearly from the --base-* values to "
        "--image-size, --mixup, --cutmix and --randaug-magnitude. At each stage the training data pipeline is "
        "rebuilt at the new size; validation stays at --eval-image-size. With --n-stages 1 the --base-* values "
        "have no effect.")
    g.add_argument("--n-stages", type=Number(int, low=1), default=1, metavar="N",
                   help="number of training stages, at most --epochs (default: %(default)s)")
    g.add_argument("--base-image-size", type=Number(int, low=1), default=None, metavar="N",
                   help="training image size of the first stage (default: --image-size)")
    g.add_argument("--base-mixup", type=Number(float, low=0), default=0.0, metavar="ALPHA",
                   help="mixup alpha of the first stage (default: %(default)s)")
    g.add_argument("--base-cutmix", type=Number(float, low=0), default=0.0, metavar="ALPHA",
                   help="CutMix alpha of the first stage (default: %(default)s)")
    g.add_argument("--base-randaug-magnitude", type=Number(int, low=0, high=RANDAUG_MAX_MAGNITUDE), default=None,
                   metavar="M",
                   help="RandAugment magnitude of the first stage (default: --randaug-magnitude)")

    g = p.add_argument_group("precision and device")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: fp16 autocast + loss scaling on GPU, bf16 autocast on CPU")
    g.add_argument("--static-loss-scale", type=Number(float, low=0, low_open=True), default=1.0, metavar="S",
                   help="initial loss scale of the GradScaler (AMP on GPU only) (default: %(default)s)")
    g.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where to run; auto is CUDA when present, else CPU (not in the reference) "
                        "(default: %(default)s)")
    g.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="disable TF32 matmuls/convolutions on Ampere and newer GPUs (not in the reference)")
    g.add_argument("--cpu-allocator", default="retain", choices=CPU_ALLOCATORS,
                   help="CPU runs under glibc: retain keeps freed memory for the next step instead of mapping every "
                        "large tensor afresh (b0 training 1.5x faster on 2 cores, resident memory stays near its "
                        "peak); system leaves glibc's defaults (not in the reference) (default: %(default)s)")
    g.add_argument("--cpu-kernels", default="auto", choices=fused.MODES,
                   help="auto: on a CPU, float32 channels_last layers run batch norm + SiLU and the SE block as fused C "
                        "kernels, compiled for this machine on first use (b0 training 1.13x faster, 28%% less memory); "
                        "off: ATen's separate layers (not in the reference) (default: %(default)s)")
    g.add_argument("--dist-backend", default="auto", choices=DIST_BACKENDS,
                   help="process-group backend of a multi-process run: auto is nccl on GPUs and gloo on CPUs; "
                        "gloo lets several processes share one GPU, which NCCL refuses (not in the reference) "
                        "(default: %(default)s)")
    g.add_argument("--gpu-affinity", default="none", type=gpu_affinity.canonical_mode, choices=gpu_affinity.MODES,
                   help="pin each process to the CPU cores near its GPU (a run without a GPU ignores it with a "
                        "warning; single and single_unique are accepted for socket_single and socket_single_unique) "
                        "(default: %(default)s)")

    g = p.add_argument_group("run control")
    g.add_argument("-p", "--print-freq", type=Number(int, low=1), default=10, metavar="N",
                   help="print and log every N iterations (default: %(default)s)")
    g.add_argument("--prof", type=Number(int, low=1, off=-1), default=-1, metavar="N",
                   help="stop each phase (train, val) after N iterations; for benchmarks (default: %(default)s)")
    g.add_argument("--seed", type=Number(int), default=None, metavar="S", help="random seed (default: none)")
    g.add_argument("--evaluate", action="store_true", help="only validate the model (no training)")
    g.add_argument("--training-only", action="store_true", help="do not validate during training")
    g.add_argument("--topk", type=Number(int, low=1), default=5, metavar="K",
                   help="the second accuracy reported beside top-1 (logged as top5), at most the number of classes "
                        "(default: %(default)s)")
    g.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="flag values from a YAML mapping, keyed by the flags' long names or dests (weight-decay or "
                        "weight_decay, model flags too), such as the <workspace>/config.yaml every run writes; flags "
                        "on the command line win (not in the reference) (default: none)")

    g = p.add_argument_group("checkpoints and reports")
    g.add_argument("--workspace", type=str, default="./", metavar="DIR",
                   help="folder for checkpoints and the report (default: %(default)s)")
    g.add_argument("--resume", type=str, default=None, metavar="PATH|auto",
                   help="continue exactly from this training checkpoint; auto: from the workspace's latest "
                        "checkpoint (<workspace>/<--checkpoint-filename>, quant_main.py's quantized_<name>) if there "
                        "is one, else start fresh, saying which: for requeued jobs and torchrun --max-restarts "
                        "(a file named auto: ./auto)")
    g.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false",
                   help="do not write checkpoints")
    g.add_argument("--checkpoint-filename", default="checkpoint.pth.tar", metavar="NAME",
                   help="name of the latest checkpoint in the workspace (default: %(default)s)")
    g.add_argument("--gather-checkpoints", type=Number(int, low=0), default=0, metavar="N",
                   help="also keep the last N per-epoch checkpoints checkpoint_<epoch:04>.pth.tar; with 0 only the "
                        "latest and the best checkpoint are stored, as in the reference (default: %(default)s)")
    g.add_argument("--raport-file", type=str, default="experiment_raport.json", metavar="NAME",
                   help="JSON-lines (DLLogger) report, relative to --workspace (default: %(default)s)")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the report's metrics as TensorBoard scalars to an event file in DIR: train.* every "
                        "--print-freq iterations, epoch/train.* and epoch/val.* every epoch, by training iteration "
                        "(rank 0; not in the reference) (default: off)")
    g.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="also log the flags and the report's metrics to an MLflow run (experiment "
                        "$MLFLOW_EXPERIMENT_NAME or efficientnet) at URI, a tracking server, sqlite:///FILE or a "
                        "folder; without URI at $MLFLOW_TRACKING_URI, else in the folder store <workspace>/mlruns "
                        "(write --mlflow after DIR or as --mlflow=URI; rank 0; not in the reference) (default: off)")
    finetune.add_arguments(p)
    distillation.add_arguments(p)
    return p


def _model_parser(arch: str) -> argparse.ArgumentParser:
    parser = get_entry(arch).parser()
    for action in parser._actions:
        if action.dest == "num_classes":  # main.py's default comes from the data (train/checks.py)
            action.help = ("number of output classes (default: the class count of the weights that --resume, "
                           "--pretrained or --pretrained-from-file load, else of the data: its class folders or "
                           "shards' classes.txt; 1000 with --data-backend synthetic)")
    return parser


def _given(argv: list[str], parser: argparse.ArgumentParser, dest: str) -> bool:
    """Whether `argv` gives the flag of `dest` (abbreviations are off, so its spellings are exact)."""
    options = [option for action in parser._actions if action.dest == dest for option in action.option_strings]
    return any(token == option or token.startswith(option + "=") for token in argv for option in options)


def _option_strings(*parsers: argparse.ArgumentParser) -> list[str]:
    return sorted({opt for parser in parsers for action in parser._actions for opt in action.option_strings})


def _apply_defaults(mains: list[argparse.ArgumentParser], model: argparse.ArgumentParser | None,
                    defaults: dict) -> None:
    main_dests = {a.dest for main in mains for a in main._actions} - NOT_SETTINGS
    model_dests = {a.dest for a in model._actions} if model is not None else set()
    unknown = sorted(set(defaults) - main_dests - model_dests)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}: not a main.py or model flag "
                         f"(valid: {', '.join(sorted(main_dests | model_dests))})")
    for parser in [*mains, *([model] if model is not None else [])]:
        dests = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in defaults.items() if k in dests})


def print_help(arch: str | None, main: argparse.ArgumentParser | None = None, file=None) -> None:
    """Main flags, then the model flags of `arch` (or of efficientnet-b0 when arch is not a registered model)."""
    main = main or build_parser()
    file = file or sys.stdout
    main.print_help(file)
    if arch not in available_models():
        arch = DEFAULT_ARCH
    print(f"\nmodel flags of {arch} (each arch has the same set; defaults differ):", file=file)
    help_text = _model_parser(arch).format_help()
    print("\n".join(line for line in help_text.splitlines() if line.strip() and "arguments:" not in line
                    and not line.startswith("options")), file=file)


def parse_args(argv: list[str] | None = None, defaults: dict | None = None, prog: str = "main.py",
               extra: Sequence[argparse.ArgumentParser] = (), settings: dict | None = None) -> argparse.Namespace:
    """Parse main.py's flags (and those of the `extra` parsers, e.g. quant_main.py's), then the arch's model flags;
    `args.model_args` holds the latter.

    Where values come from, later winning: the parsers' defaults; `defaults` (dest -> value, e.g. from
    configs.yml); `settings` (keyed as a --config file, from the Python API); the --config file; the command line.
    `prog` is the script named in errors (quant_main.py and launch.py parse main.py's flags too).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(defaults or {})
    # The arch decides which model flags exist: find it first (on the command line, else in the settings).
    probe = ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    probe.add_argument("-a", "--arch", default=None)
    probe.add_argument("-h", "--help", action="store_true")
    probe.add_argument("--config", default=None)
    known, _ = probe.parse_known_args(argv)
    main = build_parser(prog)
    sources = [("settings", settings or {})] + ([(f"--config {known.config}", read_config_file(known.config))]
                                                if known.config else [])
    num_classes_set = False  # by the settings or the --config file (configs.yml's 1000 is a default)
    for source, mapping in sources:
        values, unknown = settings_to_values(mapping, source, [main, *extra])
        arch = known.arch or values.get("arch") or defaults.get("arch", DEFAULT_ARCH)
        if arch in available_models():
            model_values, unknown = settings_to_values({k: mapping[k] for k in unknown}, source, [_model_parser(arch)])
            values.update(model_values)
            num_classes_set |= "num_classes" in model_values
        if unknown:
            raise ConfigFileError(f"{source}: {', '.join(map(repr, unknown))}: not {'a' if len(unknown) == 1 else ''} "
                                  f"{prog} or {arch} model flag{'s' if len(unknown) > 1 else ''}")
        defaults.update(values)
    arch = known.arch or defaults.get("arch", DEFAULT_ARCH)
    registered = arch in available_models()
    model = _model_parser(arch if registered else DEFAULT_ARCH)
    # The resize filter the arch's weights were trained with (bicubic for EfficientNet-Lite); configs.yml, a --config
    # file and the command line still choose.
    main.set_defaults(interpolation=get_entry(arch if registered else DEFAULT_ARCH).preprocessing.interpolation)
    _apply_defaults([main, *extra], model, defaults)
    if known.help:
        print_help(arch, main)
        raise SystemExit(0)
    if not registered:
        main.error(f"unknown --arch {arch!r}; available: {', '.join(sorted(available_models()))}")
    # One combined parser, so model flags may come anywhere (also before the data folder).
    combined = ArgumentParser(prog=prog, parents=[main, *extra, model], add_help=False, allow_abbrev=False)
    parsed, rest = combined.parse_known_args(argv)
    if rest:
        combined.error(f"unrecognized arguments: {' '.join(rest)}; valid flags: "
                       + " ".join(_option_strings(main, *extra, model)))
    check_numbers(parsed, combined)
    main_dests = {a.dest for parser in (main, *extra) for a in parser._actions} - NOT_SETTINGS
    model_dests = {a.dest for a in model._actions}
    args = argparse.Namespace(**{k: v for k, v in vars(parsed).items() if k in main_dests})
    args.model_args = argparse.Namespace(**{k: v for k, v in vars(parsed).items() if k in model_dests})
    # Without --num_classes the job takes the class count of its weights or data (config.ModelConfig).
    args.num_classes_given = num_classes_set or _given(argv, model, "num_classes")
    if args.data is None and args.data_backend != "synthetic":
        combined.error(f"the data folder (DIR) is required with --data-backend {args.data_backend}")
    return args


def parse_config(argv: list[str] | None = None, defaults: dict | None = None, prog: str = "main.py",
                 settings: dict | None = None) -> Config:
    """The Config of main.py's command line (see parse_args)."""
    return Config.from_args(parse_args(argv, defaults, prog, settings=settings))


def command_line(args: argparse.Namespace, prog: str = "main.py") -> list[str]:
    """A main.py command line that parses to `args`: --arch, then every flag whose value is not main.py's own
    default (for the arch's model flags, the arch's default), in the parser's order."""
    main, model = build_parser(prog), _model_parser(args.arch)
    argv = [args.data] if args.data is not None else []
    for parser, values in ((main, vars(args)), (model, vars(args.model_args))):
        for action in parser._actions:
            if action.dest in NOT_SETTINGS or not action.option_strings or action.dest not in values:
                continue
            value = values[action.dest]
            if value == action.default and action.dest != "arch":  # the arch said always, for the reader
                continue
            option = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                argv.append(option)
            elif action.nargs == "?" and value == action.const:
                argv.append(option)
            elif value is not None:
                argv.append(f"{option}={value}")
    return argv
