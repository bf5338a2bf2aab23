"""model2onnx.py: export a model to ONNX with a dynamic batch axis, then check the file in onnxruntime.

    model = get_entry("efficientnet-b0")(pretrained_from_file="b0.pth").eval()
    path = export_onnx(model, "b0.onnx", image_size=224)                  # opset 13, TorchScript-based exporter
    diff = verify_onnx(model, path, torch.randn(4, 3, 224, 224))          # max |onnxruntime - pytorch|

Exporter: the TorchScript-based one (`dynamo=False`) by default. It writes the reference's opset 13
(what TensorRT deployments of these models were built for), takes half a second for B0, and is the
only one Model Optimizer's fake-quant modules translate to QuantizeLinear/DequantizeLinear. The
torch.export-based exporter (`dynamo=True`) also exports the float models correctly on torch 2.14,
but it writes opset 18 or later (its conversion down to 13 fails on these graphs) and takes about
ten times longer; it is offered for toolchains that want it.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..cli import USER_ERRORS, ArgumentParser, Number, UserError, error_message, print_error
from ..models import available_models, get_entry
from ..models.weights import WeightsError
from ..preprocessing import Preprocessing
from .checkpoint_info import CheckpointInfo
from .classify import checkpoint_defaults, print_help_and_exit, weights_error_line, with_interpolation

PROG = "model2onnx.py"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
REFERENCE_OPSET = 13
DYNAMO_MIN_OPSET = 18
# Verification bounds, relative to the largest |logit| of the PyTorch output (at least 1). Float exports
# differ from PyTorch by about 1e-6 of that (summation order). In a Q/DQ network the same last-bit
# differences move values across INT8 rounding boundaries, one quantization step each, and the steps add up
# over the layers: on a trained, QAT-tuned b0 (64 px) PyTorch NCHW against PyTorch NHWC already differs by
# 2.5 % of the largest logit and onnxruntime by 8 %, with the same predicted classes.
DEFAULT_TOLERANCE = 1e-3
QUANTIZED_TOLERANCE = 0.15


class ExportError(UserError):
    """An export that cannot be made, or a file that disagrees with PyTorch; the message says why."""


def _is_quantized(model: nn.Module) -> bool:
    from ..toolkit.quantization import is_quantized
    return is_quantized(model)


def export_onnx(model: nn.Module, output: str | Path, *, image_size: int, batch_size: int = 1,
                opset: int = REFERENCE_OPSET, device: str | torch.device = "cpu", dynamo: bool = False,
                preprocessing: Preprocessing | None = None) -> Path:
    """Write `model` (eval mode, fp32) as ONNX with input `input` [N,3,S,S] and output `output` [N,C], N dynamic.

    Quantized models (efficientnet-quant-*) go through the Q/DQ export of image_classification.quantization.
    `preprocessing` (the arch's normalisation and resize filter) is recorded in the file's metadata_props, where
    classify.py's engines read it.
    """
    output = _export(model, output, image_size=image_size, batch_size=batch_size, opset=opset, device=device,
                     dynamo=dynamo)
    if preprocessing is not None:
        record_preprocessing(output, preprocessing)
    return output


def record_preprocessing(path: Path, preprocessing: Preprocessing) -> None:
    """Add the preprocessing's keys to the metadata_props of the ONNX file at `path` (rewritten in place)."""
    import onnx
    model = onnx.load(str(path))
    recorded = preprocessing.onnx_metadata()
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in recorded]
    del model.metadata_props[:]
    for key, value in [*kept, *recorded.items()]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _export(model: nn.Module, output: str | Path, *, image_size: int, batch_size: int, opset: int,
            device: str | torch.device, dynamo: bool) -> Path:
    if opset < REFERENCE_OPSET:
        raise ExportError(f"--opset must be at least {REFERENCE_OPSET}, got {opset}")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be positive, got {batch_size}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if _is_quantized(model):
        if dynamo:
            raise ExportError("quantized models export with the TorchScript-based exporter only (Model Optimizer's "
                              "quantizers have no torch.export translation); drop --dynamo")
        from ..toolkit.quantization import export_onnx_quantized
        return export_onnx_quantized(model, output, image_size=image_size, batch_size=batch_size, opset=opset,
                                     device=device, input_names=(INPUT_NAME,), output_names=(OUTPUT_NAME,))
    if dynamo and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the torch.export-based exporter (--dynamo) writes opset {DYNAMO_MIN_OPSET} or later, "
                          f"got --opset {opset}")
    was_training = model.training
    model.eval()
    # torch.export treats a batch of 1 as a constant, so the dynamic axis needs an example batch of 2 or more.
    example = torch.randn(max(batch_size, 2) if dynamo else batch_size, 3, image_size, image_size, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter, chosen above
            if dynamo:
                torch.onnx.export(model, (example,), str(output), opset_version=opset, dynamo=True,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            else:
                torch.onnx.export(model, (example,), str(output), opset_version=opset, dynamo=False,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    finally:
        model.train(was_training)
    import onnx
    onnx.checker.check_model(str(output))
    return output


def default_tolerance(model: nn.Module) -> float:
    """The verification bound for this model: QUANTIZED_TOLERANCE for Q/DQ models, else DEFAULT_TOLERANCE."""
    return QUANTIZED_TOLERANCE if _is_quantized(model) else DEFAULT_TOLERANCE


@torch.no_grad()
def verify_onnx(model: nn.Module, onnx_path: str | Path, inputs: torch.Tensor,
                tolerance: float | None = None) -> float:
    """Max |onnxruntime - PyTorch| over the logits of `inputs`; ExportError when it exceeds the bound.

    The bound is `tolerance` (default: `default_tolerance(model)`) × max(1, largest |logit| of PyTorch's output).
    """
    import onnxruntime as ort
    tolerance = default_tolerance(model) if tolerance is None else tolerance
    was_training = model.training
    model.eval()
    try:
        expected = model(inputs).float().cpu()
    finally:
        model.train(was_training)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs.detach().float().cpu().numpy()}
    actual = torch.from_numpy(session.run(None, feed)[0])
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: onnxruntime returned shape {list(actual.shape)}, PyTorch "
                          f"{list(expected.shape)}")
    diff = (actual - expected).abs().max().item()
    bound = tolerance * max(1.0, expected.abs().max().item())
    if not diff <= bound:  # also catches NaN
        raise ExportError(f"{onnx_path}: onnxruntime and PyTorch disagree: max abs difference {diff:.3g} exceeds "
                          f"the tolerance {bound:.3g} ({tolerance:g} x max(1, largest |logit|))")
    return diff


def default_output(weights: str | Path | None, arch: str) -> Path:
    """The reference's output name: the weights file with an .onnx extension (b0.pth -> b0.onnx); else <arch>.onnx.

    Unlike the reference, a training checkpoint `checkpoint.pth.tar` becomes `checkpoint.onnx` (not
    `checkpoint.onnx.tar`), and only the file name changes, never a folder that happens to contain "pth".
    """
    if not weights:
        return Path(f"{arch}.onnx")
    path = Path(weights)
    name = path.name
    for suffix in (".pth.tar", ".pt.tar"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".onnx")
    return path.with_suffix(".onnx") if path.suffix else path.with_name(name + ".onnx")


# --- command line ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """model2onnx.py's own flags (the reference's, plus --opset, --dynamo, --tolerance, --verify-batch-size)."""
    p = ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                                description="Export a model to ONNX (dynamic batch) and check it in onnxruntime. "
                                            "The arch's model flags (--pretrained-from-file, --trt True, "
                                            "--num_classes ...) are accepted too.")
    p.add_argument("-h", "--help", action="store_true", help="show this help (and the model flags) and exit")
    p.add_argument("-a", "--arch", default=None, metavar="ARCH",
                   help="model architecture, one of: " + ", ".join(sorted(available_models())) + " (default: the "
                        "arch a training checkpoint given to --pretrained-from-file records)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where the model runs during export (default: cuda when present, else cpu)")
    p.add_argument("--image-size", type=Number(int, low=1), default=None, metavar="N",
                   help="input resolution (default: the size a training checkpoint's run validated at, else the "
                        "arch's evaluation size, e.g. 224 for b0, 384 for efficientnet-v2-s)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="ONNX file to write (default: the --pretrained-from-file name with .onnx, or <arch>.onnx)")
    p.add_argument("-b", "--batch-size", type=Number(int, low=1), default=256, metavar="N",
                   help="batch of the example input traced for export; the batch axis stays dynamic "
                        "(default: %(default)s)")
    p.add_argument("--opset", type=Number(int, low=REFERENCE_OPSET), default=REFERENCE_OPSET, metavar="N",
                   help="ONNX opset, at least 13; 18 or more with --dynamo (default: %(default)s, as the reference)")
    p.add_argument("--dynamo", action="store_true",
                   help="use the torch.export-based exporter instead of the TorchScript-based one (float models)")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="fold every BatchNorm into the convolution before it (exact; for efficientnet-quant-* the "
                        "per-channel weight ranges scale with the weights, so the INT8 weights stay the same): "
                        "onnxruntime and OpenVINO fold BN only in float graphs, and without it keep a float BN "
                        "after every INT8 convolution of a Q/DQ file")
    p.add_argument("--verify-batch-size", type=Number(int, low=0), default=4, metavar="N",
                   help="after export, run a random batch of N images in onnxruntime and compare with PyTorch; "
                        "0 skips the check (default: %(default)s)")
    p.add_argument("--tolerance", type=Number(float, low=0, low_open=True), default=None, metavar="T",
                   help="fail when max |onnxruntime - pytorch| exceeds T x max(1, largest |logit|) "
                        f"(default: {DEFAULT_TOLERANCE:g}; {QUANTIZED_TOLERANCE:g} for efficientnet-quant-*, whose "
                        "INT8 rounding turns last-bit differences into whole quantization steps)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """model2onnx.py's flags, then the arch's model flags into args.model_args; unknown flags are an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        print_help_and_exit(parser, args.arch)
    args.checkpoint = checkpoint_defaults(parser, args, rest)
    return args


def run(args: argparse.Namespace) -> Path:
    """Build the model with its weights, export it, verify it; print what was done; return the file.

    On a GPU both run in true float32 (TF32 off): onnxruntime computes in float32, and TF32 convolutions on
    trained weights exceed the verification bound by themselves.
    """
    from ..context import exact_fp32
    with exact_fp32():
        return _export_and_verify(args)


def _export_and_verify(args: argparse.Namespace) -> Path:
    from ..context import select_device
    entry = get_entry(args.arch)
    info = args.checkpoint or CheckpointInfo()
    if not args.model_args.reset_classifier:
        info.check_class_count(args.model_args.num_classes)
    device = select_device(args.device)
    model = entry(**vars(args.model_args)).to(device).eval()
    image_size = args.image_size or info.image_size or entry.default_eval_image_size
    output = Path(args.output) if args.output else default_output(args.model_args.pretrained_from_file, args.arch)
    exported = model
    if args.fold_batchnorm:
        from .batchnorm_folding import fold_batchnorm
        exported = fold_batchnorm(model)
    export_onnx(exported, output, image_size=image_size, batch_size=args.batch_size, opset=args.opset, device=device,
                dynamo=args.dynamo, preprocessing=with_interpolation(entry.preprocessing, info.interpolation))
    print(f"exported {args.arch} to {output} (opset {args.opset}, input '{INPUT_NAME}' [batch, 3, {image_size}, "
          f"{image_size}], output '{OUTPUT_NAME}' [batch, {args.model_args.num_classes}], batch dynamic"
          f"{', BatchNorm folded into the convolutions' if args.fold_batchnorm else ''})")
    if args.verify_batch_size > 0:
        inputs = torch.randn(args.verify_batch_size, 3, image_size, image_size,
                             generator=torch.Generator().manual_seed(0)).to(device)
        tolerance = default_tolerance(model) if args.tolerance is None else args.tolerance
        diff = verify_onnx(model, output, inputs, tolerance)
        print(f"onnxruntime agrees with PyTorch on a batch of {args.verify_batch_size}: max abs difference "
              f"{diff:.3g} (tolerance {tolerance:g} x max(1, largest |logit|))")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """model2onnx.py: 0 on success; bad input or a failed check prints one error line and exits with 1."""
    args = parse_args(argv)
    try:
        run(args)
    except WeightsError as err:
        return print_error(PROG, weights_error_line(err, args.arch))
    except USER_ERRORS as err:  # ExportError, flag values the model rejects, an unwritable --output
        return print_error(PROG, error_message(err).splitlines()[0])
    return 0
