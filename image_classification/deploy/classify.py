"""classify.py: top-5 classes of images, preprocessed exactly as the validation pipeline does.

    python classify.py --arch efficientnet-b0 --pretrained --image cat.jpg dog.png
    python classify.py --pretrained-from-file ws/model_best.pth.tar --image flower.jpg --cpu   # a training checkpoint
    python classify.py --engine openvino --onnx b0.onnx --image cat.jpg     # model2onnx.py's file, on the CPU

A training checkpoint of this suite gives its arch, class count, validation size, crop, interpolation and class
names (checkpoint_info.py); flags on the command line win. Output per image (the reference's format): the path, then
`<class name>: <prob>%` lines, best first.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..checkpoint import CLASS_NAMES_FILE, class_difference
from ..cli import EXIT_ERROR, USER_ERRORS, ArgumentParser, Number, UserError, error_message, print_error
from ..context import ExecutionContext, create_context
from ..data import INTERPOLATIONS
from ..data.loader import Normalizer
from ..data.pytorch_backend import load_rgb, val_transform
from ..models import available_models, get_entry, parse_model_flags
from ..models.quantized import require_ranges
from ..models.weights import WeightsError
from ..preprocessing import REFERENCE, Preprocessing
from ..toolkit.tta import TTA_MODES
from .checkpoint_info import CheckpointInfo, read_checkpoint_info, weights_flag
from .engines import ENGINES, ONNX_ENGINES, Engine, TorchEngine, onnx_io_sizes, onnx_preprocessing, open_engine

PROG = "classify.py"
TOPK = 5
IMAGENET_CLASSES = 1000


class ImageError(UserError):
    """An --image that cannot be read as a picture; the message names the file."""


IMAGENET_NAMES_FILE = Path(__file__).with_name("imagenet_classes.txt")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in index order, each the WordNet synonyms of its synset ("organ, pipe organ"),
    as the reference's LOC_synset_mapping.json prints them (imagenet_classes.txt: ILSVRC-2012's synset lemmas)."""
    return read_class_names(IMAGENET_NAMES_FILE)


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line in index order (the <workspace>/classes.txt that training writes)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"--class-names {path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"--class-names {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start}); give one class name per line") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    return names


def class_names(num_classes: int, names_file: str | Path | None = None, recorded: list[str] | None = None,
                beside: Path | None = None) -> list[str]:
    """Names for each output: from `names_file`, else those the weights' checkpoint `recorded`, else those of the
    classes.txt `beside` the weights (when it lists num_classes), else ImageNet's for 1000 classes, else the class
    indices. A `names_file` that disagrees with `recorded` is warned about, as is a `beside` file of another length."""
    if names_file is not None:
        names = read_class_names(names_file)
        if len(names) != num_classes:
            raise UserError(f"--class-names {names_file} lists {len(names)} classes, the model has {num_classes} "
                             "(--num_classes)")
        difference = None if recorded is None else class_difference(names, recorded)
        if difference is not None:
            print(f"{PROG}: warning: --class-names {names_file} is not the class list the checkpoint was trained on "
                  f"({difference}); printing the file's names", file=sys.stderr)
        return names
    if recorded is not None and len(recorded) == num_classes:
        return list(recorded)
    if beside is not None:
        names = read_class_names(beside)
        if len(names) == num_classes:
            return names
        print(f"{PROG}: warning: {beside} lists {len(names)} classes, the model has {num_classes}: not using its "
              "names (--class-names FILE names the classes)", file=sys.stderr)
    if num_classes == IMAGENET_CLASSES:
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]


def load_image(path: str | Path, image_size: int, interpolation: str = "bilinear", crop_pct: float | None = None
               ) -> torch.Tensor:
    """uint8 [3,S,S] of an image file: short side to S+32 (or round(S/crop_pct)), centre crop S (the validation
    geometry).

    Decoded as the pytorch data backend decodes (16-bit grayscale scaled to 8 bits); a file that cannot be
    used, decompression bombs included, raises ImageError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        image = load_rgb(str(path))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:  # Pillow refuses over 2 x Image.MAX_IMAGE_PIXELS at open
        raise ImageError(f"{path}: too large to decode ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt files surface as these from Pillow
        raise ImageError(f"{path}: cannot decode ({err})") from None
    return val_transform(image_size, interpolation, crop_pct)(image)


@dataclass
class Prediction:
    """Top-k (class name, probability in 0..1) of one image, best first."""

    path: str
    top: list[tuple[str, float]]

    def format(self) -> str:
        """The reference's output: the path, then `<class name>: <prob>%` with one decimal."""
        return "\n".join([self.path] + [f"{name}: {100 * prob:.1f}%" for name, prob in self.top])


class Classifier:
    """A model (PyTorch, or an ONNX file in an engine) with the validation preprocessing of its input (the
    geometry of every arch; `preprocessing`'s normalisation and resize filter, the model's own) and, with `tta`
    flip, the mean of the softmax of each image and of its mirror (as tta.py in validation)."""

    def __init__(self, model: nn.Module | Engine, ctx: ExecutionContext, names: Sequence[str], image_size: int,
                 preprocessing: Preprocessing = REFERENCE, topk: int = TOPK, tta: str = "none",
                 crop_pct: float | None = None) -> None:
        if tta not in TTA_MODES:
            raise UserError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.ctx = ctx
        self.engine = model if isinstance(model, Engine) else TorchEngine(model, ctx)
        self.tta = tta
        self.names = list(names)
        self.image_size = image_size
        self.interpolation = preprocessing.interpolation
        self.crop_pct = crop_pct
        self.topk = min(topk, len(self.names))
        self.normalize = Normalizer(ctx, preprocessing.mean, preprocessing.std)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of a uint8 [B,3,S,S] batch, as float32 on the CPU."""
        images = self.normalize(self.ctx.to_device(images))
        probs = torch.softmax(self.engine(images).float(), dim=1)
        if self.tta == "flip":
            probs = (probs + torch.softmax(self.engine(images.flip(3)).float(), dim=1)) / 2
        return probs.cpu()

    def predict(self, path: str | Path) -> Prediction:
        """Top-k classes of one image file (raises ImageError for a file that is not a readable image)."""
        image = load_image(path, self.image_size, self.interpolation, self.crop_pct)
        probs = self.probabilities(image.unsqueeze(0))[0]
        values, indices = probs.topk(self.topk)
        return Prediction(str(path), [(self.names[i], p) for p, i in zip(values.tolist(), indices.tolist())])

    def predict_all(self, paths: Sequence[str | Path]) -> Iterator[Prediction | ImageError]:
        """A Prediction per path, or the ImageError of a path that failed (the others still run)."""
        for path in paths:
            try:
                yield self.predict(path)
            except ImageError as err:
                yield err


# --- command line ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """classify.py's own flags (the reference's, plus several --image paths, --class-names, --interpolation)."""
    p = ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                description="Top-5 classes of images (the arch's model flags are accepted too).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help="show this help (and the model flags) and exit")
    p.add_argument("-a", "--arch", default=None, metavar="ARCH",
                   help="model architecture, one of: " + ", ".join(sorted(available_models())) + " (default: the "
                        "arch a training checkpoint given to --pretrained-from-file records)")
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="image file(s) to classify; repeat the flag or list several paths")
    p.add_argument("--image-size", type=Number(int, low=1), default=None, metavar="N",
                   help="input size (default: the size a training checkpoint's run validated at, else the arch's "
                        "evaluation size, e.g. 224 for b0, 384 for efficientnet-v2-s; the reference always used 224)")
    p.add_argument("--eval-crop-pct", type=Number(float, low=0, high=1, low_open=True), default=None, metavar="P",
                   help="resize the short side to round(S/P) before the centre crop of S, as main.py's --eval-crop-pct "
                        "(not in the reference) (default: a training checkpoint's, else the reference's resize to "
                        "S+32)")
    p.add_argument("--interpolation", default=None, choices=INTERPOLATIONS,
                   help="resize interpolation, as main.py's --interpolation (default: a training checkpoint's, else "
                        "the one the model was trained with: bilinear for B0-B7, bicubic for efficientnet-lite*; an "
                        "--onnx file's recorded one)")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation: flip averages the softmax of the image and of its horizontal mirror "
                        "(not in the reference) (default: %(default)s)")
    p.add_argument("--precision", default=None, choices=("AMP", "FP32"),
                   help="AMP: fp16 autocast on GPU, bf16 autocast on CPU (default: AMP; --engine torch only)")
    p.add_argument("--engine", default="torch", choices=ENGINES,
                   help=f"torch: the --arch model in PyTorch; {', '.join(ONNX_ENGINES)}: the --onnx file that "
                        "model2onnx.py wrote, on the CPU, in the precision it was exported in (default: %(default)s)")
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help=f"with --engine {' or '.join(ONNX_ENGINES)}: the ONNX file to run (its input fixes --image-size, "
                        "its output the number of classes)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="one class name per line (e.g. <workspace>/classes.txt written by training); default: a "
                        "training checkpoint's class names, else the classes.txt beside the weights or --onnx file, "
                        "else ImageNet names for 1000 classes, class indices otherwise")
    return p


def print_help_and_exit(parser: argparse.ArgumentParser, arch: str | None) -> None:
    """-h of classify.py and model2onnx.py: the script's flags, then the model flags of --arch when it names one."""
    parser.print_help()
    if arch in available_models():
        print(f"\nmodel flags of {arch}:")
        print(get_entry(arch).parser().format_help())
    raise SystemExit(0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """classify.py's flags, then the arch's model flags into args.model_args; unknown flags are an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        print_help_and_exit(parser, args.arch)
    if args.engine != "torch":
        check_engine_flags(parser, args, rest)
        return args
    if args.onnx is not None:
        parser.error(f"--onnx runs in --engine {' or '.join(ONNX_ENGINES)}; --engine torch runs --arch")
    args.precision = args.precision or "AMP"
    args.checkpoint = checkpoint_defaults(parser, args, rest)
    if not args.image:
        parser.error("give at least one --image PATH")
    return args


def checkpoint_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]
                        ) -> CheckpointInfo | None:
    """Set args.arch (unless given) and args.model_args from the command line and what its --pretrained-from-file
    records (the class count a default of --num_classes); returns that record, None without such a file. Shared with
    model2onnx.py. A file that cannot be read ends the program with one line (status 1)."""
    weights = weights_flag(rest)
    info = None
    if weights is not None:
        try:
            info = read_checkpoint_info(weights)
        except USER_ERRORS as err:
            raise SystemExit(print_error(parser.prog, error_message(err).splitlines()[0])) from None
    args.arch = args.arch or (info.arch if info else None)
    if args.arch is None:
        parser.error("--arch is required unless --pretrained-from-file is a training checkpoint of this suite, which "
                     "records it; available: " + ", ".join(sorted(available_models())))
    parse_model_flags(parser, args, rest, parser.prog,
                      defaults={"num_classes": info.num_classes} if info and info.num_classes else None)
    return info


def check_engine_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """An ONNX engine runs --onnx as exported: flags that choose or change a PyTorch model are refused."""
    if args.onnx is None:
        parser.error(f"--engine {args.engine} runs an ONNX file: give --onnx FILE (written by model2onnx.py)")
    given = (["--arch"] if args.arch else []) + (["--precision"] if args.precision else []) + \
        [flag for flag in rest if flag.startswith("-")]
    if given:
        parser.error(f"--engine {args.engine} runs --onnx {args.onnx} as exported (model, weights, precision); "
                     f"{', '.join(given)} apply to --engine torch")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.image:
        parser.error("give at least one --image PATH")


def weights_error_line(err: WeightsError, arch: str) -> str:
    """One line for a WeightsError: its headline, with a hint when the weights belong to another model."""
    # WeightsError explains a misfit over several lines; the headline plus a hint is the one line users need.
    headline = str(err).splitlines()[0]
    if "does not fit" in headline:
        headline += f" {arch} (weights of another --arch, or other model flags such as --trt?)"
    return headline


def build_classifier(args: argparse.Namespace) -> Classifier:
    """The model (with its weights), device/precision context and class names that `args` describe."""
    if args.engine != "torch":
        return build_engine_classifier(args)
    entry = get_entry(args.arch)
    info = args.checkpoint or CheckpointInfo()
    if not args.model_args.reset_classifier:
        info.check_class_count(args.model_args.num_classes)
    names = class_names(args.model_args.num_classes, args.class_names, info.classes, info.names_file)
    ctx = create_context(device="cpu" if args.cpu else None, amp=args.precision == "AMP",
                         amp_flags=("--precision AMP (the default)", "pass --precision FP32"))
    model = entry(**vars(args.model_args))
    require_ranges(model, source=args.model_args.pretrained_from_file or args.arch)
    if not (getattr(args.model_args, "pretrained", False) or args.model_args.pretrained_from_file):
        print(f"{PROG}: warning: {args.arch} has random weights (no --pretrained or --pretrained-from-file)",
              file=sys.stderr)
    image_size = args.image_size or info.image_size or entry.default_eval_image_size
    preprocessing = with_interpolation(entry.preprocessing, args.interpolation or info.interpolation)
    return Classifier(model, ctx, names, image_size, preprocessing, tta=args.tta,
                      crop_pct=args.eval_crop_pct or info.crop_pct)


def with_interpolation(preprocessing: Preprocessing, interpolation: str | None) -> Preprocessing:
    """`preprocessing` with --interpolation's filter (or a checkpoint's) when there is one."""
    return preprocessing if interpolation is None else replace(preprocessing, interpolation=interpolation)


def build_engine_classifier(args: argparse.Namespace) -> Classifier:
    """The --onnx file in an ONNX engine (--engine onnxruntime, openvino, ...), its size and classes read from the file."""
    image_size, num_classes = onnx_io_sizes(args.onnx)
    if args.image_size is not None and args.image_size != image_size:
        raise UserError(f"--image-size {args.image_size}: --onnx {args.onnx} takes {image_size} x {image_size} "
                        "images (export another size with model2onnx.py --image-size)")
    beside = Path(args.onnx).parent / CLASS_NAMES_FILE
    names = class_names(num_classes, args.class_names, beside=beside if beside.is_file() else None)
    engine = open_engine(args.engine, args.onnx)
    # The normalisation model2onnx.py recorded in the file (files without it get the reference's).
    preprocessing = with_interpolation(onnx_preprocessing(args.onnx), args.interpolation)
    return Classifier(engine, create_context(device="cpu", amp=False), names, image_size, preprocessing,
                      tta=args.tta, crop_pct=args.eval_crop_pct)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the top-5 of every --image; 0 when all were classified, 1 when any failed (each said why)."""
    args = parse_args(argv)
    try:
        classifier = build_classifier(args)
    except WeightsError as err:
        return print_error(PROG, weights_error_line(err, args.arch))
    except USER_ERRORS as err:  # e.g. a --class-names file that does not match --num_classes, a missing engine
        return print_error(PROG, error_message(err).splitlines()[0])
    failed = 0
    for result in classifier.predict_all(args.image):
        if isinstance(result, ImageError):
            failed += 1
            print_error(PROG, str(result))
        else:
            print(result.format(), flush=True)
    return EXIT_ERROR if failed else 0
