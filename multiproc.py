#!/usr/bin/env python3
"""Start one training process per GPU (or per CPU worker) on each node: the reference's flags on torchrun.

    python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
    # two nodes; run on each with its --node_rank:
    python multiproc.py --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        main.py /imagenet ...

Each process gets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from torch.distributed.run
(torchrun) and joins the process group: NCCL on GPUs, gloo on CPU. `torchrun` itself works the same way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from image_classification.cli import EXIT_ERROR, EXIT_INTERRUPTED, ArgumentParser, Number


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="multiproc.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--nnodes", type=Number(int, low=1), default=1, help="number of nodes (default: %(default)s)")
    p.add_argument("--node_rank", type=Number(int, low=0), default=0,
                   help="rank of this node, 0..nnodes-1 (default: %(default)s)")
    p.add_argument("--nproc_per_node", type=Number(int, low=1), default=1,
                   help="processes on this node, one per GPU (default: %(default)s)")
    p.add_argument("--master_addr", default="127.0.0.1", help="address of the node with rank 0 (default: %(default)s)")
    p.add_argument("--master_port", type=Number(int, low=1, high=65535), default=29500,
                   help="free port on that node (default: %(default)s)")
    p.add_argument("training_script", help="the script each process runs (main.py, quant_main.py, launch.py)")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The equivalent torch.distributed.run command line."""
    if not Path(args.training_script).is_file():
        raise SystemExit(f"multiproc.py: error: {args.training_script}: no such file (the script each process runs)")
    if not 0 <= args.node_rank < args.nnodes:
        raise SystemExit(f"multiproc.py: error: --node_rank must be in 0..{args.nnodes - 1}")
    return [f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}", f"--nproc_per_node={args.nproc_per_node}",
            f"--master_addr={args.master_addr}", f"--master_port={args.master_port}",
            args.training_script, *args.training_script_args]


def main(argv: list[str] | None = None) -> None:
    """Parse the reference's launcher flags and hand over to torchrun (which exits with the workers' status)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.main(torchrun_argv(args))
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        if codes == {EXIT_INTERRUPTED}:  # every failed process stopped on a signal after saving: pass that on
            print(f"multiproc.py: {args.training_script} stopped by a signal; continue with --resume",
                  file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        # The failing process has printed its own error; say which one and pass on a non-zero status.
        failures = ", ".join(f"rank {rank} (exit {f.exitcode})" for rank, f in err.failures.items())
        print(f"multiproc.py: {args.training_script} failed on {failures}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None


if __name__ == "__main__":
    main()
