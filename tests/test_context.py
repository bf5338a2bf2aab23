"""The execution context: process-group backends, ranks per GPU, GPU affinity (context.py, gpu_affinity.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from image_classification.arguments import parse_args
from image_classification.context import create_context
from image_classification.gpu_affinity import affinity_for, parse_cpulist

ROOT = Path(__file__).resolve().parents[1]


def test_dist_backend_is_nccl_on_gpus_gloo_on_cpus_and_gloo_lets_ranks_share_a_gpu(monkeypatch):
    from image_classification.cli import UserError
    from image_classification.context import dist_backend_for
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dist_backend_for("auto", gpu) == "nccl" and dist_backend_for("auto", cpu) == "gloo"
    assert dist_backend_for("gloo", gpu, ranks_per_gpu=2) == "gloo"
    with pytest.raises(UserError, match="NCCL refuses two ranks on one GPU.*--dist-backend gloo"):
        dist_backend_for("auto", gpu, ranks_per_gpu=2)
    with pytest.raises(UserError, match="--dist-backend nccl needs GPUs"):
        dist_backend_for("nccl", cpu)
    assert parse_args(["/data", "--dist-backend", "gloo"]).dist_backend == "gloo"
    with pytest.raises(UserError, match="--dist-backend nccl needs GPUs"):  # a single process checks it too
        create_context(device="cpu", dist_backend="nccl")
    assert parse_args(["/data"]).dist_backend == "auto"


def _ranks_per_gpu_worker(rank: int, store_file: str, identities: list[str], out: str) -> None:
    import torch.distributed as dist

    from image_classification.context import ranks_per_gpu
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=len(identities))
    try:
        Path(out, str(rank)).write_text(str(ranks_per_gpu(identities[rank])))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("identities, expected", [(["GPU-a", "GPU-b"], 1), (["GPU-a", "GPU-a"], 2)])
@pytest.mark.slow
def test_ranks_sharing_a_gpu_are_counted_by_the_gpus_identity(tmp_path, identities, expected):
    # Each rank may see its own GPU as cuda:0 (a GPU per process): only the UUIDs tell whether they share one.
    # The ranks are forked (a spawned interpreter imports torch again, seconds each, for a few bytes of gloo).
    import torch.multiprocessing as mp
    (tmp_path / "out").mkdir()
    mp.start_processes(_ranks_per_gpu_worker, args=(str(tmp_path / "store"), identities, str(tmp_path / "out")),
                       nprocs=len(identities), start_method="fork")
    assert [int((tmp_path / "out" / str(r)).read_text()) for r in range(len(identities))] == [expected] * 2


def test_gpu_affinity_modes_and_cpu_refusal():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    sockets = [list(range(0, 8))] * 2 + [list(range(8, 16))] * 2
    assert affinity_for("socket", 1, sockets) == list(range(8))
    assert len(affinity_for("single", 2, sockets)) >= 1
    a, b = affinity_for("socket_unique_contiguous", 0, sockets), affinity_for("socket_unique_contiguous", 1, sockets)
    assert a and b and not set(a) & set(b) and set(a) | set(b) <= set(range(8))
    c, d = affinity_for("single_unique", 2, sockets), affinity_for("single_unique", 3, sockets)
    assert not set(c) & set(d)
    from image_classification.gpu_affinity import set_affinity
    with pytest.warns(UserWarning, match="--gpu-affinity socket pins .* this run is on cpu, so it is ignored"):
        assert set_affinity("socket", create_context(device="cpu")) is None
