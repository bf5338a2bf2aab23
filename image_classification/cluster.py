"""Process placement under SLURM: the torch.distributed env:// variables from an srun job step's variables.

torchrun (and multiproc.py, which runs on it) gives every process RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A job step started by `srun` without torchrun has SLURM's
own variables instead; `export_slurm_placement` translates them before the process group is joined:

    RANK              SLURM_PROCID
    WORLD_SIZE        SLURM_STEP_NUM_TASKS, else SLURM_NTASKS
    LOCAL_RANK        SLURM_LOCALID
    LOCAL_WORLD_SIZE  this node's entry of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("8(x2),4"),
                      else SLURM_NTASKS_PER_NODE
    MASTER_ADDR       the first host of SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST ("node[01-03,07],gpu5"
                      is node01): srun places task 0 on the first node of the step
    MASTER_PORT       DEFAULT_MASTER_PORT (29500, torchrun's default)

A variable already in the environment is kept (export MASTER_ADDR or MASTER_PORT in the batch script to choose
them); when a torch launcher has set RANK, WORLD_SIZE or LOCAL_RANK, SLURM's variables are not read at all.
The host list is expanded here, as `scontrol show hostnames` would, since scontrol need not exist where the
tasks run (inside a container, for one).

`elastic_store` gives the process group a store of its own when torchrun may restart the worker group: the
store torchrun's c10d rendezvous shares with the workers outlives a restart, and the restarted group would
read the previous group's keys (PyTorch issue 135712), connecting to dead ranks or hanging.
"""
from __future__ import annotations

import itertools
import os
import re
import time
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from .cli import UserError

DEFAULT_MASTER_PORT = 29500
# Set by torchrun/torch.distributed.run for each worker: their presence means a torch launcher placed us.
TORCH_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class ClusterError(UserError):
    """A SLURM variable that cannot be read as what SLURM documents it to be; the message names it."""


@dataclass(frozen=True)
class Placement:
    """Where one process stands in a multi-process run: what env:// initialisation reads."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None   # None when SLURM does not say how many tasks this node runs
    master_addr: str
    master_port: int

    def environment(self) -> dict[str, str]:
        """The torch.distributed variables of this placement."""
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
               "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}
        if self.local_world_size is not None:
            env["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        return env


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _expand_brackets(body: str, name: str, value: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; numbers keep the width of the range's first bound, as SLURM's."""
    out = []
    for part in body.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise ClusterError(f"{name}={value!r}: [{body}] is not a list of numbers and ranges (a-b)")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ClusterError(f"{name}={value!r}: the range {part} runs backwards")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return out


def expand_hostlist(value: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Every host of a SLURM host list, in its order: 'node[01-02,07],gpu5' -> node01, node02, node07, gpu5.

    A name may hold several bracket groups ('rack[1-2]-n[1-2]': rack1-n1, rack1-n2, rack2-n1, rack2-n2).
    `name` is the variable it came from, for the error message.
    """
    hosts = []
    item, depth = "", 0
    for char in value + ",":
        if char == "," and depth == 0:
            if not item:
                raise ClusterError(f"{name}={value!r}: an empty host name")
            hosts.extend(_expand_host(item, name, value))
            item = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ClusterError(f"{name}={value!r}: unbalanced brackets")
        item += char
    if depth:
        raise ClusterError(f"{name}={value!r}: unbalanced brackets")
    return hosts


def _expand_host(item: str, name: str, value: str) -> list[str]:
    pieces = re.split(r"\[([^\]]*)\]", item)  # literal, bracket body, literal, ...
    choices = [[piece] if i % 2 == 0 else _expand_brackets(piece, name, value) for i, piece in enumerate(pieces)]
    return ["".join(parts) for parts in itertools.product(*choices)]


def expand_tasks_per_node(value: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """SLURM's compressed per-node counts: '8(x2),4' -> [8, 8, 4]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ClusterError(f"{name}={value!r}: not a list of task counts such as 8(x2),4")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """(name, value) of the first of `names` that is set and not empty."""
    for name in names:
        if environ.get(name):
            return name, environ[name]
    return None


def _integer(environ: Mapping[str, str], *names: str, low: int = 0) -> int | None:
    found = _first(environ, *names)
    if found is None:
        return None
    name, value = found
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        raise ClusterError(f"{name}={value!r}: expected a whole number >= {low}")
    return number


def in_srun_step(environ: Mapping[str, str]) -> bool:
    """Whether this process is a task of an srun job step (not the batch script itself, nor an salloc shell).

    The batch step also has SLURM_PROCID=0 and SLURM_NTASKS=<the job's tasks>, but no step id: reading those
    there would have one process wait for tasks that were never started.
    """
    return bool(environ.get("SLURM_PROCID")) and bool(environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID"))


def slurm_placement(environ: Mapping[str, str]) -> Placement | None:
    """This process's placement in an srun job step, from SLURM's variables (see the module docstring);
    None outside one or where a torch launcher has placed it."""
    if any(name in environ for name in TORCH_LAUNCHER_VARIABLES) or not in_srun_step(environ):
        return None
    rank = _integer(environ, "SLURM_PROCID")
    world_size = _integer(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", low=1)
    if world_size is None:
        raise ClusterError("SLURM_PROCID is set but SLURM_NTASKS is not: cannot tell the number of processes")
    if rank >= world_size:
        raise ClusterError(f"SLURM_PROCID={rank} is not below the step's {world_size} tasks")
    local_rank = _integer(environ, "SLURM_LOCALID") or 0
    nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if environ.get("MASTER_ADDR"):
        master_addr = environ["MASTER_ADDR"]
    elif nodelist is not None:
        master_addr = expand_hostlist(nodelist[1], nodelist[0])[0]
    elif world_size == 1:
        master_addr = "127.0.0.1"
    else:
        raise ClusterError("SLURM_JOB_NODELIST is not set: cannot tell where rank 0 runs; export MASTER_ADDR")
    master_port = _integer(environ, "MASTER_PORT", low=1)
    return Placement(rank=rank, world_size=world_size, local_rank=local_rank,
                     local_world_size=_local_world_size(environ), master_addr=master_addr,
                     master_port=master_port if master_port is not None else DEFAULT_MASTER_PORT)


def _local_world_size(environ: Mapping[str, str]) -> int | None:
    """The tasks on this node: its entry of the per-node list, else the uniform --ntasks-per-node."""
    per_node = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node is not None:
        counts = expand_tasks_per_node(per_node[1], per_node[0])
        node = _integer(environ, "SLURM_STEP_NODEID", "SLURM_NODEID") or 0
        if node < len(counts):
            return counts[node]
    return _integer(environ, "SLURM_NTASKS_PER_NODE", low=1)


def export_slurm_placement(environ: MutableMapping[str, str] | None = None) -> Placement | None:
    """Under srun without torchrun, set the env:// variables SLURM's give (those already set are kept) and
    return the placement; None, with nothing set, elsewhere. Call before joining the process group."""
    environ = os.environ if environ is None else environ
    placement = slurm_placement(environ)
    if placement is None:
        tasks = environ.get("SLURM_NTASKS", "")
        if (tasks.isdigit() and int(tasks) > 1 and not in_srun_step(environ)
                and not any(name in environ for name in TORCH_LAUNCHER_VARIABLES)):
            warnings.warn(f"this SLURM job has {tasks} tasks but this process was not started by srun, so it "
                          "runs alone; start it with srun (efficientnet/slurm/) to use every task", stacklevel=2)
        return None
    for name, value in placement.environment().items():
        environ.setdefault(name, value)
    return placement


# The agent-store key under which global rank 0 publishes the port of this attempt's process-group store.
ELASTIC_STORE_KEY = "image_classification/process_group_store_port"


def elastic_store(rank: int, world_size: int, environ: Mapping[str, str] | None = None, *,
                  timeout: timedelta = timedelta(minutes=30), probe: timedelta = timedelta(seconds=3)
                  ) -> dist.Store | None:
    """A fresh store for this attempt's process group where torchrun shares its rendezvous store with the workers
    and may restart them (TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_MAX_RESTARTS > 0); None elsewhere, where
    env:// serves.

    Rank 0 starts a store on a free port of its host (MASTER_ADDR, where torchrun put global rank 0) and
    publishes the port in the shared store. The key may still hold a port of an earlier attempt, whose rank 0 is
    gone: the other ranks try each port they read for `probe` and read the key again until a store answers.
    TORCHELASTIC_RESTART_COUNT cannot name the attempt instead: an agent restarting its workers because another
    node failed does not count a restart, so the count differs between nodes.
    """
    environ = os.environ if environ is None else environ
    if (environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0):
        return None
    host = environ["MASTER_ADDR"]
    shared = dist.TCPStore(host, int(environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    if rank == 0:
        own = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        shared.set(ELASTIC_STORE_KEY, str(own.port))
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port = int(shared.get(ELASTIC_STORE_KEY))
        try:
            store = dist.TCPStore(host, port, is_master=False, timeout=probe)
        except RuntimeError:  # an earlier attempt's rank 0: nobody listens there any more
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        store.set_timeout(timeout)
        return store
