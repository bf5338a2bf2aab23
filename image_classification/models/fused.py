"""Fused CPU kernels for the memory-bound layers of EfficientNet: BN + SiLU, and squeeze-excitation's scale.

Both apply to float32 channels_last activations on the CPU, in eager mode.
- Batch norm + SiLU, in training (batch statistics, running statistics updated as nn.BatchNorm2d updates
  them) and in inference without autograd (running statistics): two of the five passes over memory forward,
  three of the seven backward, and one saved activation per layer (the SiLU's input is recomputed from the
  BN's input) fewer than ATen's separate layers.
- Squeeze-excitation (x * sigmoid(expand(SiLU(squeeze(mean(x)))))) in training: its backward reads the
  block's activations twice and writes once where ATen's makes five passes; the small [N, C] layers between
  are differentiated here by hand.

The kernels are compiled on first use with the machine's C compiler (`$CC`, default cc) for its own CPU
(-march=native) into a cache folder keyed by the source, compiler, flags and CPU, so a home folder shared by
different machines keeps one build per CPU; scripts/setup.sh builds them at install time. Where there is no
compiler, or the build fails, a warning says why once and every layer runs ATen's BN and SiLU; `--cpu-kernels
off` (`set_enabled(False)`) does the same on purpose. TorchScript, tracing, torch.compile and export always
see the plain layers.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..cli import main_process

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
# -ffast-math lets the compiler vectorise expf through glibc's vector maths library (libmvec) and reassociate
# the per-thread float sums; -fopenmp spreads rows over torch's thread count.
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared")
MODES = ("auto", "off")

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use the fused kernels where they apply (the default), or always ATen's layers (`--cpu-kernels off`)."""
    global _enabled
    _enabled = enabled


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    wanted = [line for line in lines if line.startswith(("flags", "model name"))][:2]
    return platform.machine() + "\n".join(wanted)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "efficientnet-pytorch" / "kernels"


def library_path() -> Path:
    """Where this machine's build of the kernels lives (it may not exist yet)."""
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(b"\0".join(part.encode() for part in (
        SOURCE.read_text(), version, " ".join(FLAGS), _cpu_signature()))).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels-{key}.so"


def build() -> Path:
    """Compile the kernels into the cache (a no-op when this machine's build is there); returns the library."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent ranks never load a half-written library.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([_compiler(), *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{_compiler()} failed on {SOURCE}: {result.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_POINTER, _INT64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "bn_stats": (_POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _INT),
    "bn_act_forward": (_POINTER, _POINTER, _INT64, _INT64, _POINTER, _POINTER, _INT, _INT),
    "bn_act_backward_sums": (_POINTER, _POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _INT, _POINTER,
                             _POINTER, _POINTER, _POINTER, _INT),
    "bn_act_backward_input": (_POINTER, _POINTER, _POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _POINTER,
                              _POINTER, _INT, _INT),
    "se_scale_sums": (_POINTER, _POINTER, _INT64, _INT64, _INT64, _POINTER, _INT),
    "se_scale_input_grad": (_POINTER, _POINTER, _POINTER, _POINTER, _INT64, _INT64, _INT64, _INT),
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        if main_process():  # the same machine and build for every rank of a node
            log.warning("fused CPU batch-norm kernels unavailable (%s); using ATen's batch norm and SiLU", err)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def available() -> bool:
    """Whether the kernels are (or could now be) built and loaded on this machine."""
    return _library() is not None


def _needs_autograd(bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or bn.weight.requires_grad or bn.bias.requires_grad)


def _eager_float32_channels_last(x: torch.Tensor) -> bool:
    return (_enabled and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def applies(bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    """Whether `batch_norm_act(bn, x)` may replace bn (+ SiLU) for this call."""
    # isinstance: BN folding (batchnorm_folding.py) leaves an Identity in its place.
    if not (isinstance(bn, nn.BatchNorm2d) and _eager_float32_channels_last(x) and bn.affine
            and bn.weight.dtype == torch.float32 and bn.track_running_stats):
        return False
    if bn.training:
        # ATen refuses a single value per channel; let it say so.
        return x.numel() // x.shape[1] > 1 and _library() is not None
    # Inference with running statistics; training a frozen BN's input (eval mode with autograd) stays ATen's.
    return not _needs_autograd(bn, x) and _library() is not None


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """SiLU(bn(x)) (or bn(x) without `silu`) where `applies(bn, x)`; the same values as the two modules."""
    if not bn.training:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        out = torch.empty_like(x, memory_format=torch.channels_last)
        _library().bn_act_forward(_ptr(x), _ptr(out), x.numel() // x.shape[1], x.shape[1], _ptr(scale.contiguous()),
                                  _ptr(shift.contiguous()), int(silu), _threads())
        return out
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return _TrainingBatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps,
                                       silu)


class _TrainingBatchNormAct(torch.autograd.Function):
    """Batch statistics, running-statistics update, normalise (+ SiLU); backward recomputes the SiLU input."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, silu):
        library, threads = _library(), _threads()
        channels = x.shape[1]
        rows = x.numel() // channels
        mean, var = x.new_empty(channels), x.new_empty(channels)
        scratch = torch.zeros(2 * channels * threads, dtype=torch.float64)
        library.bn_stats(_ptr(x), rows, channels, _ptr(mean), _ptr(var), _ptr(scratch), threads)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var, alpha=momentum * rows / (rows - 1))
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        shift = bias - mean * scale
        out = torch.empty_like(x, memory_format=torch.channels_last)
        library.bn_act_forward(_ptr(x), _ptr(out), rows, channels, _ptr(scale), _ptr(shift), int(silu), threads)
        ctx.save_for_backward(x, weight, mean, invstd, scale, shift)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, scale, shift = ctx.saved_tensors
        library, threads = _library(), _threads()
        grad = grad.contiguous(memory_format=torch.channels_last)
        channels = x.shape[1]
        rows = x.numel() // channels
        sum_g, sum_gx = x.new_empty(channels), x.new_empty(channels)
        scratch = torch.zeros(2 * channels * threads, dtype=torch.float64)
        grad_input = torch.empty_like(x, memory_format=torch.channels_last) if ctx.needs_input_grad[0] else None
        # With a SiLU, the sums' pass leaves dL/dy in grad_input, and the input gradient is computed over it in
        # place: one exponential per element in the backward instead of two.
        grad_y = grad_input if ctx.silu and grad_input is not None else None
        library.bn_act_backward_sums(_ptr(grad), _ptr(x), rows, channels, _ptr(scale), _ptr(shift), _ptr(mean),
                                     int(ctx.silu), _ptr(sum_g), _ptr(sum_gx), _ptr(grad_y) if grad_y is not None
                                     else None, _ptr(scratch), threads)
        if grad_input is not None:
            # dx = w·invstd·(dy - mean(dy) - x̂·mean(dy·x̂)), x̂ = (x - mean)·invstd, written as dy·k + x·p + q.
            k = weight * invstd
            c = sum_gx * invstd * invstd / rows
            p = -k * c
            q = -k * (sum_g / rows) + k * c * mean
            source, silu = (grad_y, 0) if grad_y is not None else (grad, int(ctx.silu))
            library.bn_act_backward_input(_ptr(source), _ptr(x), _ptr(grad_input), rows, channels, _ptr(scale),
                                          _ptr(shift), _ptr(k), _ptr(p), _ptr(q), silu, threads)
        grad_weight = sum_gx * invstd if ctx.needs_input_grad[1] else None
        grad_bias = sum_g if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def se_applies(x: torch.Tensor, *layers: nn.Linear) -> bool:
    """Whether `squeeze_excitation(x, squeeze, expand)` may replace the module's forward: training (autograd)."""
    return (_eager_float32_channels_last(x) and torch.is_grad_enabled()
            and all(layer.weight.dtype == torch.float32 for layer in layers) and _library() is not None)


def squeeze_excitation(x: torch.Tensor, squeeze: nn.Linear, expand: nn.Linear) -> torch.Tensor:
    """x * sigmoid(expand(SiLU(squeeze(mean of x over H, W)))), as SqueezeExcitation computes it."""
    return _SqueezeExcitation.apply(x, squeeze.weight, squeeze.bias, expand.weight, expand.bias)


class _SqueezeExcitation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, squeeze_weight, squeeze_bias, expand_weight, expand_bias):
        pooled = x.sum((2, 3)) / (x.shape[2] * x.shape[3])
        hidden = torch.addmm(squeeze_bias, pooled, squeeze_weight.t())
        activated = hidden * torch.sigmoid(hidden)
        attention = torch.sigmoid(torch.addmm(expand_bias, activated, expand_weight.t()))
        ctx.save_for_backward(x, pooled, hidden, activated, attention, squeeze_weight, expand_weight)
        return x * attention[:, :, None, None]

    @staticmethod
    def backward(ctx, grad):
        x, pooled, hidden, activated, attention, squeeze_weight, expand_weight = ctx.saved_tensors
        library, threads = _library(), _threads()
        grad = grad.contiguous(memory_format=torch.channels_last)
        n, channels, height, width = x.shape
        grad_attention = x.new_empty(n, channels)
        library.se_scale_sums(_ptr(grad), _ptr(x), n, height * width, channels, _ptr(grad_attention), threads)
        grad_logits = grad_attention * attention * (1 - attention)  # through the sigmoid
        grad_expand_weight, grad_expand_bias = grad_logits.t() @ activated, grad_logits.sum(0)
        sigmoid = torch.sigmoid(hidden)
        grad_hidden = (grad_logits @ expand_weight) * sigmoid * (1 + hidden * (1 - sigmoid))  # through the SiLU
        grad_squeeze_weight, grad_squeeze_bias = grad_hidden.t() @ pooled, grad_hidden.sum(0)
        grad_input = None
        if ctx.needs_input_grad[0]:
            # The mean's gradient, per sample and channel, joins the scale's in the same pass.
            grad_pooled = (grad_hidden @ squeeze_weight).div_(height * width).contiguous()
            grad_input = torch.empty_like(x, memory_format=torch.channels_last)
            library.se_scale_input_grad(_ptr(grad), _ptr(attention), _ptr(grad_pooled), _ptr(grad_input), n,
                                        height * width, channels, threads)
        return grad_input, grad_squeeze_weight, grad_squeeze_bias, grad_expand_weight, grad_expand_bias
