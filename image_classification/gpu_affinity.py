"""--gpu-affinity: pin each process to CPU cores close to its GPU (the reference's modes).

The cores near a GPU are read from sysfs (/sys/bus/pci/devices/<pci id>/local_cpulist); GPUs with the same
local core list share a socket. Hyper-thread siblings stay together when cores are divided.

  socket                     all cores of the GPU's socket
  socket_single              the first core of the socket (alias: single)
  socket_single_unique       one core per GPU of the socket, distinct (alias: single_unique)
  socket_unique_interleaved  the socket's cores split among its GPUs, round robin
  socket_unique_contiguous   the socket's cores split among its GPUs, in contiguous blocks
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from .cli import UserError

# The reference's mode names; earlier releases of this suite called two of them by shorter names, kept as aliases.
MODES = ("none", "socket", "socket_single", "socket_single_unique", "socket_unique_interleaved",
         "socket_unique_contiguous")
ALIASES = {"single": "socket_single", "single_unique": "socket_single_unique"}
SYSFS_PCI = Path("/sys/bus/pci/devices")
SYSFS_CPU = Path("/sys/devices/system/cpu")


def canonical_mode(name: str) -> str:
    """The reference's name of a --gpu-affinity mode (aliases resolved; unknown names pass through to be refused)."""
    return ALIASES.get(name, name)


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def _local_cpus(pci_id: str) -> list[int]:
    path = SYSFS_PCI / pci_id / "local_cpulist"
    if not path.is_file():
        path = SYSFS_PCI / pci_id.lower() / "local_cpulist"
    try:
        return parse_cpulist(path.read_text())
    except OSError as err:
        raise UserError(f"--gpu-affinity: cannot read the CPU list of GPU {pci_id} ({err})") from None


def _physical_cores(cpus: list[int]) -> list[list[int]]:
    """Group logical CPUs into physical cores (hyper-thread siblings together), in order of first CPU."""
    allowed = set(cpus)
    cores: dict[tuple[int, ...], list[int]] = {}
    for cpu in cpus:
        siblings_file = SYSFS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            siblings = tuple(c for c in parse_cpulist(siblings_file.read_text()) if c in allowed)
        except OSError:
            siblings = (cpu,)
        cores.setdefault(siblings or (cpu,), list(siblings or (cpu,)))
    return sorted(cores.values(), key=lambda core: core[0])


def affinity_for(mode: str, gpu_index: int, local_cpus_per_gpu: list[list[int]]) -> list[int]:
    """The CPUs the process driving GPU `gpu_index` is pinned to under `mode` (pure, for tests)."""
    mode = canonical_mode(mode)
    if mode not in MODES or mode == "none":
        raise UserError(f"--gpu-affinity must be one of {', '.join(MODES[1:])} here, got {mode!r}")
    socket = local_cpus_per_gpu[gpu_index]
    cores = _physical_cores(socket)
    peers = [i for i, cpus in enumerate(local_cpus_per_gpu) if cpus == socket]
    rank_on_socket = peers.index(gpu_index)
    if mode == "socket":
        return sorted(socket)
    if mode == "socket_single":
        return list(cores[0])
    if mode == "socket_single_unique":
        return list(cores[rank_on_socket % len(cores)])
    if mode == "socket_unique_interleaved":
        mine = cores[rank_on_socket::len(peers)] or [cores[rank_on_socket % len(cores)]]
    else:
        per_gpu = max(1, len(cores) // len(peers))
        mine = cores[rank_on_socket * per_gpu:(rank_on_socket + 1) * per_gpu] or [cores[rank_on_socket % len(cores)]]
    return sorted(cpu for core in mine for cpu in core)


def set_affinity(mode: str, ctx) -> list[int] | None:
    """Pin this process for its GPU; returns the CPU list, or None when nothing was pinned (mode none, a run
    without a GPU, or no allowed core near the GPU: the last two with a warning)."""
    if mode == "none":
        return None
    if not ctx.is_cuda:
        # A performance hint, as --amp is on a CPU: a DGX recipe run on a machine without a GPU still runs. Every
        # rank would say the same: rank 0 says it.
        if ctx.is_main_process:
            warnings.warn(f"--gpu-affinity {mode} pins processes to the cores near their GPU; this run is on "
                          f"{ctx.device.type}, so it is ignored", stacklevel=2)
        return None
    pci_ids = ctx.pci_bus_ids()
    wanted = affinity_for(mode, ctx.device.index or 0, [_local_cpus(pci) for pci in pci_ids])
    # A container's or job's cpuset may leave out some of those cores: pinning to them would be refused (EINVAL).
    allowed = os.sched_getaffinity(0)
    cpus = [cpu for cpu in wanted if cpu in allowed]
    if not cpus:
        warnings.warn(f"--gpu-affinity {mode}: none of the cores near GPU {ctx.device} ({wanted}) is available to "
                      f"this process ({sorted(allowed)}); affinity left as it is", stacklevel=2)
        return None
    os.sched_setaffinity(0, cpus)
    return cpus
