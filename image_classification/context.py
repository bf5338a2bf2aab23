"""The one place that decides device, precision, memory format and process group.

Everything else (models, data pipelines, the training loop) receives an
`ExecutionContext` and never asks `torch.cuda` itself.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .cli import UserError
from .cluster import elastic_store, export_slurm_placement


@dataclass
class ExecutionContext:
    """Device, numeric precision, memory format and distributed placement of a run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """fp16 on GPU (with loss scaling), bf16 on CPU (no scaling needed); None without --amp."""
        if not self.amp:
            return None
        return torch.float16 if self.is_cuda else torch.bfloat16

    @property
    def channels_last(self) -> bool:
        return self.memory_format == torch.channels_last

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the forward pass, or a no-op context without --amp."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self, init_scale: float = 1.0) -> torch.amp.GradScaler:
        """The reference's loss scaler; enabled only where fp16 needs it (AMP on GPU)."""
        return torch.amp.GradScaler(
            self.device.type,
            init_scale=init_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=100,
            enabled=self.amp and self.is_cuda,
        )

    def synchronize(self) -> None:
        """Wait for queued device work; only for timing at print frequency, never per step."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def pin_memory(self) -> bool:
        """Pinned host memory only pays off when batches are copied to a GPU."""
        return self.is_cuda

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Asynchronous host-to-device copy."""
        return tensor.to(self.device, non_blocking=self.is_cuda)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device_rng_state(self) -> torch.Tensor | None:
        """The accelerator's RNG state (for exact resume), or None on CPU."""
        return torch.cuda.get_rng_state(self.device) if self.is_cuda else None

    def set_device_rng_state(self, state: torch.Tensor | None) -> None:
        """Restore what `device_rng_state` returned (ignored on CPU or when None)."""
        if self.is_cuda and state is not None:
            torch.cuda.set_rng_state(state.cpu(), self.device)

    def __enter__(self) -> "ExecutionContext":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Leave the process group create_context joined: after a job that ended well every rank first waits at a
        barrier, so that none tears the group down while another is in its last collective (or rank 0 writes its
        last checkpoint)."""
        if not self.distributed or not dist.is_initialized():
            return
        try:
            if exc_type is None:
                dist.barrier()
        finally:
            dist.destroy_process_group()

    def pci_bus_ids(self) -> list[str]:
        """PCI addresses (sysfs form, e.g. 0000:07:00.0) of the visible GPUs, for CPU affinity; [] without CUDA."""
        if not torch.cuda.is_available():
            return []
        ids = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            ids.append(f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")
        return ids


def ranks_per_gpu(identity: str) -> int:
    """The most ranks of the (initialised) process group that name the same GPU `identity`, exchanged over a
    gloo group of their own."""
    group = dist.new_group(backend="gloo")
    try:
        identities: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(identities, identity, group=group)
    finally:
        dist.destroy_process_group(group)
    return max(collections.Counter(identities).values())


@contextlib.contextmanager
def exact_fp32():
    """Within the block, CUDA float32 convolutions and matmuls run in float32, not TF32.

    cuDNN's TF32 convolutions are on by default on Ampere and newer GPUs (10 mantissa bits): a check of a
    model against another runtime's float32 needs them off. The previous settings come back afterwards.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def memory_format_from_name(name: str) -> torch.memory_format:
    """Map the reference's --memory-format value (nchw|nhwc) to a torch memory format."""
    formats = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    if name not in formats:
        raise UserError(f"--memory-format must be one of {sorted(formats)}, got {name!r}")
    return formats[name]


def select_device(requested: str | None = None) -> torch.device:
    """CUDA when present, otherwise CPU; `requested` ('cpu', 'cuda', 'cuda:1') overrides (ValueError when unmet)."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} was asked for, but this machine has no usable CUDA GPU")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16 or AMX); without them bf16 autocast is emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


CPU_ALLOCATORS = ("retain", "system")

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- AttributeError on other C libraries
    except (OSError, AttributeError):
        return None
    return libc


def set_cpu_allocator(mode: str) -> bool:
    """Choose how glibc's malloc treats the large tensors of CPU training; True when `mode` is in effect.

    retain: every block comes from the heap and freed memory stays with the process, so each step's
    activations reuse the pages of the step before. glibc's defaults instead map every tensor over 32 MiB
    afresh and unmap it when freed, and give the heap's free top back to the system: each step page-faults its
    whole working set in again (b0, batch 32 at 224: 10 M minor faults and 1.5x the step time on 2 cores).
    The price is a resident set that stays near its high-water mark plus fragmentation: glibc 2.36's
    posix_memalign (PyTorch's CPU allocation) grows the heap for a while before it reuses freed blocks, +20 %
    peak resident memory on that b0 run.
    system: glibc's defaults, untouched. Elsewhere than glibc (macOS, musl) both mean the system allocator.
    """
    if mode not in CPU_ALLOCATORS:
        raise UserError(f"--cpu-allocator must be one of {CPU_ALLOCATORS}, got {mode!r}")
    if mode == "system":
        return True
    libc = _glibc()
    int_max = 2**31 - 1  # both parameters are C ints
    return libc is not None and all(libc.mallopt(param, int_max) == 1
                                    for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


DIST_BACKENDS = ("auto", "nccl", "gloo")


def dist_backend_for(requested: str, device: torch.device, ranks_per_gpu: int = 1) -> str:
    """The process-group backend: auto is NCCL on GPUs and gloo on CPUs; NCCL needs one GPU per rank."""
    if requested not in DIST_BACKENDS:
        raise UserError(f"--dist-backend must be one of {DIST_BACKENDS}, got {requested!r}")
    backend = requested if requested != "auto" else "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("--dist-backend nccl needs GPUs; this run is on the CPU: use --dist-backend gloo (or auto)")
    if backend == "nccl" and ranks_per_gpu > 1:
        raise UserError(f"{ranks_per_gpu} processes share {device} and NCCL refuses two ranks on one GPU: start "
                        "one process per GPU, or pass --dist-backend gloo")
    return backend


def create_context(
    device: str | None = None,
    amp: bool = False,
    memory_format: str = "nchw",
    allow_tf32: bool = True,
    amp_flags: tuple[str, str] = ("--amp", "leave --amp off"),
    dist_backend: str = "auto",
) -> ExecutionContext:
    """Build the context from CLI-level choices, joining the process group when launched distributed; `with ctx:`
    leaves it at the end.

    `amp_flags` says, in the calling script's words, how mixed precision was asked for and how to turn it off,
    for the warning on CPUs that emulate bf16. `dist_backend` is --dist-backend (see `dist_backend_for`).
    The placement (rank, world size, local rank, master address) comes from torchrun's variables, or under
    srun without torchrun from SLURM's (cluster.py).
    """
    export_slurm_placement()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        # TF32 matmuls/convs on Ampere and newer, as the reference's TF32 precision mode assumes.
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = True
    if amp and dev.type == "cpu" and rank == 0 and not cpu_has_native_bf16():
        asked, turn_off = amp_flags
        warnings.warn(f"{asked} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX) runs "
                      f"bf16 emulated, several times slower than fp32; {turn_off} here", stacklevel=2)
    # Checked in a single process too: a flag never does nothing.
    backend = dist_backend_for(dist_backend, dev)
    if world_size > 1 and not dist.is_initialized():
        store = elastic_store(rank, world_size)
        if store is None:
            dist.init_process_group(backend=backend, init_method="env://")
        else:  # torchrun may restart the group: a store of this attempt's own (cluster.elastic_store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        if backend == "nccl":
            # Whether ranks share a GPU shows only in the GPUs' UUIDs: with a GPU per process
            # (CUDA_VISIBLE_DEVICES per task, srun --gpus-per-task 1) every rank sees its own as cuda:0.
            try:
                dist_backend_for(dist_backend, dev, ranks_per_gpu(str(torch.cuda.get_device_properties(dev).uuid)))
            except UserError:
                dist.destroy_process_group()
                raise
    return ExecutionContext(
        device=dev,
        amp=amp,
        memory_format=memory_format_from_name(memory_format),
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
    )
