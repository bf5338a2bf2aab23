"""Calibration, the QAT hook of quant_main.py and INT8 ONNX export, all through NVIDIA Model Optimizer.

    model = get_entry("efficientnet-quant-b0")(pretrained_from_file="float.pth")
    stats = calibrate(model, loader, num_batches=10)          # ranges for every quantizer
    ...train as usual (fake-quant with straight-through gradients)...
    export_onnx_quantized(model, "b0.onnx", image_size=224)  # QuantizeLinear/DequantizeLinear, opset 13

The quantizers are placed by models.quantized; this module never fake-quantizes by itself.
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..cli import Number, UserError
from ..config import Config
from ..logger import DEFAULT
from ..models.quantized import CALIBRATORS, QuantEfficientNet, modelopt_quantization, place_ranges, quant_config, \
    quantizers, require_ranges

# The reference's calibration: histograms of |x|, the range read off at the 99.99th percentile.
REFERENCE_PERCENTILE = 99.99
DEFAULT_PERCENTILE = 99.9


def is_quantized(model: nn.Module) -> bool:
    """True for efficientnet-quant-* models (also when wrapped by DDP)."""
    return isinstance(getattr(model, "module", model), QuantEfficientNet)


def _images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 10, calibrator: str = "histogram",
              percentile: float = DEFAULT_PERCENTILE, synchronize: Callable[[], None] | None = None
              ) -> dict[str, float]:
    """Set the range of every quantizer from `num_batches` batches; return calib.* throughput metrics.

    Weights: per-channel absolute max. Inputs: `histogram` (the reference: a histogram of |x|, the
    range at its 99.99th percentile), `percentile` (the same histogram at the `percentile`-th
    percentile) or `max` (running absolute max, Model Optimizer's max calibration), of the activations
    QAT trains on: BatchNorm normalises with batch statistics (see `batch_statistics`). Ranges that are
    not finite are refused, naming the quantizer.

    The KL-divergence (entropy) and MSE reads of the histogram are not offered: on the small
    generated data set they clip the SE inputs (a few values per image) to a tenth of their range
    and the calibrated b0 drops to chance (bench/qat_accuracy.py), and entropy takes minutes on a CPU.
    """
    if calibrator not in CALIBRATORS:
        raise UserError(f"unknown --calibrator {calibrator!r}; choose from {', '.join(CALIBRATORS)}")
    if num_batches < 1:
        raise UserError(f"--calibration-batches must be at least 1, got {num_batches}")
    if not 0.0 < percentile <= 100.0:
        raise UserError(f"--calibration-percentile must be in (0, 100], got {percentile}")
    mtq = modelopt_quantization()
    # Re-applying the placement with this run's calibrator type also drops ranges of an earlier calibration.
    mtq.set_quantizer_by_cfg(model, quant_config(calibrator)["quant_cfg"])
    stats = {"images": 0, "data_time": 0.0, "compute_time": 0.0, "batches": 0}

    def forward_loop(m: nn.Module) -> None:
        iterator = iter(batches)
        end = time.perf_counter()
        for _ in range(num_batches):
            try:
                images = _images(next(iterator))
            except StopIteration:
                break
            start = time.perf_counter()
            with batch_statistics(m), checked_inputs(m, stats["batches"]):
                m(images)
            if synchronize is not None:
                synchronize()
            now = time.perf_counter()
            stats["data_time"] += start - end
            stats["compute_time"] += now - start
            stats["images"] += images.shape[0]
            stats["batches"] += 1
            end = now

    if calibrator == "max":
        mtq.calibrate(model, algorithm="max", forward_loop=forward_loop)
    else:
        was_training = model.training
        model.eval()
        mtq.model_calib.enable_stats_collection(model)
        forward_loop(model)
        for quantizer in quantizers(model).values():
            if isinstance(quantizer._calibrator, mtq.calib.HistogramCalibrator):
                # The reference read its input ranges off the histogram at the 99.99th percentile.
                value = percentile if calibrator == "percentile" else REFERENCE_PERCENTILE
                quantizer.load_calib_amax("percentile", percentile=value)
            else:
                quantizer.load_calib_amax()  # weights: per-channel max
            quantizer.enable_quant()
            quantizer.disable_calib()
        model.train(was_training)
    if stats["batches"] == 0:
        raise UserError("calibration saw no data: the training loader is empty")
    require_ranges(model, source="calibration")
    check_finite_ranges(model)
    place_ranges(model)
    total = stats["data_time"] + stats["compute_time"]
    return {
        "calib.total_ips": stats["images"] / total if total > 0 else 0.0,
        "calib.data_time": stats["data_time"] / stats["batches"],
        "calib.compute_latency": stats["compute_time"] / stats["batches"],
    }


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """BatchNorm layers normalise with each batch's own statistics; their running statistics stay untouched.

    Calibration must see the activations QAT trains on, and QAT trains in training mode, where BatchNorm uses
    batch statistics. Running statistics (eval mode) describe the same activations only once they have
    converged: for a briefly trained float model (BN momentum 0.01, a few hundred steps) they are still near
    their initial 0/1, eval-mode activations grow by orders of magnitude through the network (to inf in b4),
    and ranges taken from them made the first QAT step's gradients NaN. Dropout and stochastic depth stay
    off (the model itself is in eval mode).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (training, momentum, tracked) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@contextlib.contextmanager
def checked_inputs(model: nn.Module, batch: int):
    """Look at each quantizer's input before its calibrator does: stop at the first that holds NaN or infinity,
    in one line naming it, and restart a histogram that has only seen zeros.

    Model Optimizer's histogram calibrator fails on both with an OverflowError deep inside it: infinity has no
    bin, and a histogram begun on a batch of zeros has bins of zero width that cannot grow to a later batch's
    values (an SE gate whose sigmoid underflows to exactly 0 on one batch and not the next does that). An
    all-zero batch adds nothing to a range, so the histogram restarts from the next batch with values.
    """
    def check(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.is_meta:
                return  # meta tensors (shape-only tracing) hold no values to check
            if not bool(torch.isfinite(x).all()):
                raise UserError(f"calibration batch {batch}: the input of {name} holds NaN or infinite values: the "
                                "model's activations overflow, so its float weights cannot be quantized (did the float "
                                "run diverge? check it with main.py --evaluate)")
            calibrator = getattr(module, "_calibrator", None)
            edges = getattr(calibrator, "_calib_bin_edges", None)
            if edges is not None and float(edges[-1]) == 0.0 and bool(x.any()):
                calibrator.reset()
        return hook

    handles = [quantizer.register_forward_pre_hook(check(name)) for name, quantizer in quantizers(model).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_finite_ranges(model: nn.Module) -> None:
    """Refuse calibrated ranges that are not finite (activations overflowed), naming the first quantizer."""
    for name, quantizer in quantizers(model).items():
        amax = quantizer.amax
        if amax is not None and not bool(torch.isfinite(amax).all()):
            raise UserError(f"calibration: {name} got a range of {float(amax.max())}: the model's activations "
                            "overflow on the calibration batches, so its float weights cannot be quantized (did the "
                            "float run diverge? check it with main.py --evaluate)")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """quant_main.py's flags on top of main.py's."""
    group = parser.add_argument_group("quantization")
    group.add_argument("--skip-calibration", action="store_true",
                       help="do not calibrate: the weights (e.g. an NGC QAT file) already carry quantizer ranges")
    group.add_argument("--calibration-batches", type=Number(int, low=1), default=10, metavar="N",
                       help="training batches used for calibration (default: %(default)s)")
    group.add_argument("--calibrator", default="histogram", choices=CALIBRATORS,
                       help="how input ranges are chosen: histogram (the reference: 99.99th percentile of a "
                            "histogram of |x|), percentile (the same at --calibration-percentile) or max "
                            "(default: %(default)s)")
    group.add_argument("--calibration-percentile", type=Number(float, low=0, high=100, low_open=True),
                       default=DEFAULT_PERCENTILE, metavar="P",
                       help="with --calibrator percentile: percentile of |x| taken as the range "
                            "(default: %(default)s)")
    return parser


def calibration_hook(config: Config, model: nn.Module, train_loader: Iterable, ctx, logger) -> nn.Module:
    """The train package's prepare_model for quant_main.py: calibrate a fresh run, else insist on ranges.

    --resume brings the ranges with the checkpoint (loaded after this hook), --evaluate and
    --skip-calibration take them from the loaded weights.
    """
    if not is_quantized(model):
        raise UserError(f"quant_main.py trains efficientnet-quant-* models; --arch {config.model.arch} is a float "
                        "model (use main.py)")
    if config.checkpoint.resume:
        return model
    quant = config.quantization
    if config.runtime.evaluate or quant.skip_calibration:
        require_ranges(model, source=config.model.params.get("pretrained_from_file") or "loaded weights")
        return model
    stats = calibrate(model, train_loader, num_batches=quant.calibration_batches, calibrator=quant.calibrator,
                      percentile=quant.calibration_percentile, synchronize=getattr(ctx, "synchronize", None))
    if logger is not None:
        # The reference registers calib.* when it calibrates and logs them as step ["Calibration", it].
        logger.register_metrics("calib", {name.split(".")[1]: DEFAULT for name in stats})
        logger.log(("Calibration", quant.calibration_batches), stats)
    return model


def export_onnx_quantized(model: nn.Module, output: str | Path, *, image_size: int, batch_size: int = 1,
                          opset: int = 13, device: str | torch.device = "cpu",
                          input_names: tuple[str, ...] = ("input",), output_names: tuple[str, ...] = ("output",),
                          dynamic_batch: bool = True) -> Path:
    """Write a fake-quantized model as ONNX with QuantizeLinear/DequantizeLinear pairs (for TensorRT).

    Model Optimizer's quantizers have ONNX symbolics for the TorchScript-based exporter only, hence
    `dynamo=False`; per-channel Q/DQ needs opset 13 or later.
    """
    if opset < 13:
        raise UserError(f"INT8 Q/DQ export needs opset 13 or later (per-channel scales), got {opset}")
    require_ranges(model, source="export")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    example = torch.randn(batch_size, 3, image_size, image_size, device=device)
    dynamic_axes = {input_names[0]: {0: "batch"}, output_names[0]: {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer notes that the ranges become constants of the graph, which is the point of calibration.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (example,), str(output), opset_version=opset, dynamo=False,
                          input_names=list(input_names), output_names=list(output_names), dynamic_axes=dynamic_axes)
    model.train(was_training)
    return output
