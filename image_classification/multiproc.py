"""Start one training process per GPU (or per CPU worker) on each node: the reference's flags on torchrun.

    python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
    # two nodes; run on each with its --node_rank:
    python multiproc.py --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        main.py /imagenet ...

Each process gets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from torch.distributed.run
(torchrun) and joins the process group: NCCL on GPUs, gloo on CPU. `torchrun` itself works the same way.

SIGTERM or SIGINT (to this process or to its process group) reaches every worker as SIGTERM: each finishes its
step, saves, and exits 75; so does multiproc.py, as main.py does. (torchrun's own handling would send the signal,
give the workers 30 s, kill them, and exit 1 with a traceback.) A second SIGINT reaches them as SIGINT: abort.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from .cli import EXIT_ERROR, EXIT_INTERRUPTED, ArgumentParser, Number


def build_parser() -> argparse.ArgumentParser:
    """The reference's launcher flags, then the script each process runs and its arguments."""
    p = ArgumentParser(prog="multiproc.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nnodes", type=Number(int, low=1), default=1, help="number of nodes (default: %(default)s)")
    p.add_argument("--node_rank", type=Number(int, low=0), default=0,
                   help="rank of this node, 0..nnodes-1 (default: %(default)s)")
    p.add_argument("--nproc_per_node", type=Number(int, low=1), default=1,
                   help="processes on this node, one per GPU (default: %(default)s)")
    p.add_argument("--master_addr", default="127.0.0.1", help="address of the node with rank 0 (default: %(default)s)")
    p.add_argument("--master_port", type=Number(int, low=1, high=65535), default=29500,
                   help="free port on that node (default: %(default)s)")
    p.add_argument("training_script", help="the script each process runs (main.py, quant_main.py, launch.py), or an "
                                           "installed command such as efficientnet-train")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The equivalent torch.distributed.run command line. A script file runs under this Python; an installed command
    (efficientnet-train, from `pip install -e .`) runs as it is."""
    script = [args.training_script]
    if not Path(args.training_script).is_file():
        command = shutil.which(args.training_script) if os.sep not in args.training_script else None
        if command is None:
            raise SystemExit(f"multiproc.py: error: {args.training_script}: no such file or command (the script "
                             "each process runs)")
        script = ["--no-python", command]
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"multiproc.py: error: --node_rank must be in 0..{args.nnodes - 1}")
    return [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", f"--nproc_per_node={args.nproc_per_node}",
            f"--master_addr={args.master_addr}", f"--master_port={args.master_port}",
            *script, *args.training_script_args]


def children() -> list[int]:
    """The PIDs of this process's children (torchrun's workers), from /proc."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
        except OSError:  # a thread that has just ended
            pass
    return pids


class ForwardStop:
    """SIGTERM/SIGINT handlers that pass the stop on to the workers, as SIGTERM (finish the step, save, exit 75);
    a second SIGINT passes on as SIGINT, which aborts them. A signal before any worker runs ends the launch."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:
        again = bool(self.received)
        self.received.append(signum)
        workers = children()
        if not workers:
            raise SystemExit(EXIT_INTERRUPTED)  # torchrun's clean-up runs on the way out
        forwarded = signal.SIGINT if again and signum == signal.SIGINT else signal.SIGTERM
        for pid in workers:
            try:
                os.kill(pid, forwarded)
            except ProcessLookupError:
                pass


def main(argv: list[str] | None = None) -> None:
    """Parse the reference's launcher flags and hand over to torchrun (which exits with the workers' status)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    argv = torchrun_argv(args)
    if os.path.isdir("/proc/self/task"):
        # torchrun handles the other signals as it does; SIGTERM and SIGINT are ours to pass on.
        argv = ["--signals-to-handle=SIGHUP,SIGQUIT", *argv]
        ForwardStop().install()
    try:
        torchrun.main(argv)
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        # A rank exits 75 only past the barrier that follows rank 0's checkpoint: the run is saved, and ranks
        # that torchrun then stopped with a signal (as it stops the others once one has exited) lost nothing.
        if EXIT_INTERRUPTED in codes and codes <= {EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL}:
            print(f"multiproc.py: {args.training_script} stopped by a signal; continue with --resume",
                  file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        # The failing process has printed its own error; say which one and pass on a non-zero status.
        failures = ", ".join(f"rank {rank} (exit {f.exitcode})" for rank, f in err.failures.items())
        print(f"multiproc.py: {args.training_script} failed on {failures}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None

