"""Cluster launch: SLURM's variables as the process placement (srun without torchrun), the sbatch recipe, and
--resume auto, also across a torchrun elastic restart of the worker group.

The multi-process runs are real processes on the CPU (gloo), started by the test itself: two main.py processes
with simulated SLURM task variables, and torchrun with a c10d rendezvous whose worker group loses a worker once.
They train a tiny BN-free model on the synthetic backend, a few iterations per epoch.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import prefork
import tiny_model as tiny_model_module
from runs import free_port
from image_classification.atomic import atomic_save
from image_classification.cluster import (DEFAULT_MASTER_PORT, ELASTIC_STORE_KEY, ClusterError, Placement,
                                          elastic_store, expand_hostlist, expand_tasks_per_node,
                                          export_slurm_placement, slurm_placement)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "efficientnet" / "slurm" / "DGXA100_efficientnet-b0_AMP.sbatch"
PLACEMENT_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --- host lists and task counts -------------------------------------------------------------------------------

@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5,node[01-02]", ["gpu5", "node01", "node02"]),
    ("dgx[8-11]", ["dgx8", "dgx9", "dgx10", "dgx11"]),       # no padding without a leading zero
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),        # the first bound's width
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("login.cluster.org,c[1-2].cluster.org", ["login.cluster.org", "c1.cluster.org", "c2.cluster.org"]),
])
def test_host_lists_expand_as_scontrol_show_hostnames(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[01-", "node]1[", "node[3-1]", "node[a-b]", "node[]", "", "a,,b",
                                      "n[[1-2]]"])
def test_a_malformed_host_list_names_the_variable(hostlist):
    with pytest.raises(ClusterError, match=r"^SLURM_STEP_NODELIST="):
        expand_hostlist(hostlist, "SLURM_STEP_NODELIST")


def test_tasks_per_node_expand_their_repeat_counts():
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert expand_tasks_per_node("2") == [2]
    with pytest.raises(ClusterError, match="SLURM_TASKS_PER_NODE='8x2'"):
        expand_tasks_per_node("8x2")


# --- placement --------------------------------------------------------------------------------------------------

def srun_task(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """The variables srun gives one task of a 2-node, 16-task step (8 per node), as SLURM sets them."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NODEID": str(nodeid), "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS_PER_NODE": "8",
            "SLURM_JOB_NODELIST": "dgx[07-08]", "SLURM_STEP_NODELIST": "dgx[07-08]", **extra}


def test_an_srun_task_gets_rank_world_local_rank_and_the_first_host_as_master():
    assert slurm_placement(srun_task(11, 3, 1)) == Placement(rank=11, world_size=16, local_rank=3,
                                                             local_world_size=8, master_addr="dgx07",
                                                             master_port=DEFAULT_MASTER_PORT)
    assert DEFAULT_MASTER_PORT == 29500


def test_the_job_variables_serve_where_the_step_ones_are_missing():
    env = {"SLURM_STEP_ID": "3", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_NTASKS": "4",
           "SLURM_TASKS_PER_NODE": "2,1(x2)", "SLURM_JOB_NODELIST": "node[01-03,07],gpu5"}
    placement = slurm_placement(env)
    assert (placement.rank, placement.world_size, placement.local_rank) == (2, 4, 0)
    assert placement.local_world_size == 1          # the third node runs one task
    assert placement.master_addr == "node01"
    uniform = {**env, "SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS_PER_NODE": "2"}
    assert slurm_placement(uniform).local_world_size == 2
    assert slurm_placement({**env, "SLURM_TASKS_PER_NODE": ""}).local_world_size is None


def test_exported_master_address_and_port_win():
    placement = slurm_placement(srun_task(0, 0, 0, MASTER_ADDR="10.1.2.3", MASTER_PORT="31000"))
    assert (placement.master_addr, placement.master_port) == ("10.1.2.3", 31000)


def test_torchrun_placement_wins_and_the_batch_step_is_not_a_task():
    assert slurm_placement(srun_task(3, 3, 0, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")) is None
    batch_step = {k: v for k, v in srun_task(0, 0, 0).items() if not k.startswith("SLURM_STEP")}
    assert slurm_placement(batch_step) is None
    with pytest.warns(UserWarning, match="16 tasks but this process was not started by srun"):
        assert export_slurm_placement(dict(batch_step)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert export_slurm_placement({"PATH": "/usr/bin"}) is None   # not under SLURM: nothing to say


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": "16"}, "SLURM_PROCID=16 is not below the step's 16 tasks"),
    ({"SLURM_STEP_NUM_TASKS": "many"}, "SLURM_STEP_NUM_TASKS='many': expected a whole number >= 1"),
    ({"SLURM_STEP_NUM_TASKS": "", "SLURM_NTASKS": ""}, "SLURM_NTASKS is not"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT='0'"),
    ({"SLURM_STEP_NODELIST": "dgx[07-"}, "SLURM_STEP_NODELIST='dgx\\[07-': unbalanced brackets"),
    ({"SLURM_STEP_NODELIST": "", "SLURM_JOB_NODELIST": ""}, "export MASTER_ADDR"),
])
def test_unreadable_slurm_variables_are_named(change, message):
    with pytest.raises(ClusterError, match=message):
        slurm_placement(srun_task(1, 1, 0, **change))


def test_export_sets_only_the_missing_torch_variables():
    env = srun_task(9, 1, 1, MASTER_PORT="31000")
    placement = export_slurm_placement(env)
    assert placement is not None
    assert {name: env[name] for name in PLACEMENT_VARIABLES} == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "dgx07",
        "MASTER_PORT": "31000"}


@pytest.fixture
def restored_environ():
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def test_create_context_reads_a_single_task_step(restored_environ):
    from image_classification.context import create_context
    for name in [*restored_environ]:
        if name in PLACEMENT_VARIABLES or name.startswith(("SLURM_", "TORCHELASTIC_")):
            del restored_environ[name]
    restored_environ.update({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
                             "SLURM_JOB_NODELIST": "cn[3-4]"})
    ctx = create_context(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    assert restored_environ["MASTER_ADDR"] == "cn3" and restored_environ["MASTER_PORT"] == "29500"


# --- torchrun restarts: a store per attempt ---------------------------------------------------------------------

def test_no_store_of_its_own_unless_torchrun_shares_its_store_and_may_restart():
    assert elastic_store(0, 2, {}) is None
    assert elastic_store(0, 2, {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert elastic_store(0, 2, {"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "3"}) is None


def test_a_restarted_group_skips_the_port_an_earlier_attempt_published(monkeypatch):
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)   # torchrun's shared store
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(agent.port)}
    gone = socket.socket()   # the previous attempt's rank 0: its port bound but not listening, so never reused
    gone.bind(("127.0.0.1", 0))
    stale = gone.getsockname()[1]
    agent.set(ELASTIC_STORE_KEY, str(stale))
    refused = threading.Event()
    real_store = dist.TCPStore

    def recording_store(host, port, *args, **kwargs):
        try:
            return real_store(host, port, *args, **kwargs)
        except RuntimeError:
            refused.set()
            raise

    monkeypatch.setattr(dist, "TCPStore", recording_store)
    joined = {}
    rank1 = threading.Thread(target=lambda: joined.update(store=elastic_store(1, 2, env, probe=timedelta(seconds=1))))
    rank1.start()
    assert refused.wait(timeout=60)   # rank 1 has tried the stale port; only now does this attempt's rank 0 start
    own = elastic_store(0, 2, env)
    rank1.join(timeout=60)
    assert own.port != stale and int(agent.get(ELASTIC_STORE_KEY)) == own.port
    joined["store"].set("rank 1", "here")
    assert own.get("rank 1") == b"here"
    gone.close()


# --- processes ------------------------------------------------------------------------------------------------

WORKER = '''
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import tiny_model
tiny_model.register()

attempts = os.environ.get("ATTEMPTS_FILE")
if attempts:  # one line per started worker: its restart count and rank
    with open(attempts, "a") as f:
        f.write(os.environ.get("TORCHELASTIC_RESTART_COUNT", "-") + " " + os.environ.get("RANK", "-") + "\\n")

import image_classification.train.loop as loop
train_one_epoch = loop.train_one_epoch
def dying_once(job, epoch, *args, **kwargs):
    # Rank 0 dies at the start of epoch 1, after it wrote epoch 0's checkpoint; the marker makes it happen once.
    marker = os.environ.get("DIE_ONCE_MARKER")
    if marker and epoch == 1 and job.ctx.rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return train_one_epoch(job, epoch, *args, **kwargs)
loop.train_one_epoch = dying_once

sys.argv[0] = "main.py"
import main
raise SystemExit(main.exit_status(main.main()))
'''


def write_worker(tmp_path: Path) -> Path:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    return worker


def toy_flags(workspace: Path, epochs: int, *extra: str) -> list[str]:
    return ["--arch", "tiny-bn-free", "--data-backend", "synthetic", "-b", "4", "--epochs", str(epochs),
            "--prof", "3", "--lr", "0.1", "--seed", "5", "--print-freq", "1", "--workspace", str(workspace),
            "--device", "cpu", "--dist-backend", "gloo", "-j", "0", *extra]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's placement (torch's, torchelastic's or SLURM's)."""
    env = {k: v for k, v in os.environ.items()
           if k not in PLACEMENT_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def parameters(report: Path) -> dict:
    records = [json.loads(line[len("DLLL "):]) for line in report.read_text().splitlines()]
    flags = [r["data"] for r in records if r["type"] == "LOG" and r["step"] == "PARAMETER"]
    assert len(flags) == 2, "rank 0 alone writes the report: the flags' and the model's records, once"
    return flags[0]


@pytest.mark.slow
def test_two_srun_tasks_without_torchrun_join_one_gloo_group(tmp_path):
    worker, workspace = write_worker(tmp_path), tmp_path / "ws"
    port = free_port()
    processes = []
    for rank in (0, 1):
        # What srun gives two tasks on one node; the job's node list starts with this host.
        env = clean_env(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                        SLURM_NODEID="0", SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="2",
                        SLURM_JOB_NODELIST="localhost,node[02-03]", MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, str(worker), *toy_flags(workspace, 2)], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=240) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    flags = parameters(workspace / "experiment_raport.json")
    assert (flags["world_size"], flags["distributed"], flags["local_rank"]) == (2, True, 0)
    saved = torch.load(workspace / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 2
    assert len(saved["rng"]) == 2   # gathered from both ranks over the process group
    assert "DLL" in outputs[0][0] and "DLL" not in outputs[1][0]   # rank 1 prints no log lines


@pytest.mark.slow
def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    worker, workspace = write_worker(tmp_path), tmp_path / "ws"
    marker, attempts = tmp_path / "died", tmp_path / "attempts"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "1", str(worker),
               *toy_flags(workspace, 3, "--resume", "auto")]
    result = prefork.run(command, cwd=ROOT, timeout=240,
                         env=clean_env(DIE_ONCE_MARKER=str(marker), ATTEMPTS_FILE=str(attempts)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()   # a worker did die
    assert sorted(attempts.read_text().split("\n")[:-1]) == ["0 0", "0 1", "1 0", "1 1"]   # the group restarted once
    assert f"=> --resume auto: no checkpoint at {workspace / 'checkpoint.pth.tar'}; starting fresh" in result.stdout
    assert f"=> resumed from {workspace / 'checkpoint.pth.tar'}: epoch 1" in result.stdout
    saved = torch.load(workspace / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 3 and saved["world_size"] == 2
    assert [record["train.image_size"] for record in saved["history"]] == [8, 8, 8]   # each epoch once


# --- --resume auto in one process -------------------------------------------------------------------------------

@pytest.fixture
def tiny_model(monkeypatch):
    from image_classification import models
    monkeypatch.setitem(models._REGISTRY, tiny_model_module.NAME, tiny_model_module.TinyEntry())


def run_main(*argv: str) -> dict:
    from image_classification.arguments import parse_config
    from image_classification.train import run
    return run(parse_config(list(argv)))


def test_resume_auto_starts_fresh_then_continues_the_epochs(tiny_model, tmp_path, capsys):
    summary = run_main(*toy_flags(tmp_path, 3, "--resume", "auto", "--run-epochs", "1"))
    out = capsys.readouterr().out
    assert f"=> --resume auto: no checkpoint at {tmp_path / 'checkpoint.pth.tar'}; starting fresh" in out
    assert summary["epoch"] == 1
    summary = run_main(*toy_flags(tmp_path, 3, "--resume", "auto"))
    out = capsys.readouterr().out
    assert f"=> resumed from {tmp_path / 'checkpoint.pth.tar'}: epoch 1" in out and "starting fresh" not in out
    assert summary["epoch"] == 3
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert saved["epoch"] == 3 and len(saved["history"]) == 3


def test_resume_auto_looks_for_the_scripts_own_checkpoint_name(tmp_path):
    from image_classification.arguments import parse_args
    from image_classification.config import Config
    from image_classification.context import create_context
    from image_classification.train.resume import resume_path
    ctx = create_context(device="cpu")
    args = parse_args(["--data-backend", "synthetic", "--resume", "auto", "--workspace", str(tmp_path),
                       "--checkpoint-filename", "last.pth.tar"])
    config, quantized = Config.from_args(args), Config.from_args(args, checkpoint_prefix="quantized_")
    atomic_save({"epoch": 1}, tmp_path / "last.pth.tar")
    assert resume_path(config, ctx) == str(tmp_path / "last.pth.tar")
    assert resume_path(quantized, ctx) is None   # quant_main.py's is quantized_<name>
    atomic_save({"epoch": 1}, tmp_path / "quantized_last.pth.tar")
    assert resume_path(quantized, ctx) == str(tmp_path / "quantized_last.pth.tar")
    explicit = config.replace(resume="other.pth.tar")
    assert resume_path(explicit, ctx) == "other.pth.tar"
    assert resume_path(config.replace(resume=None), ctx) is None


# --- the sbatch recipe ----------------------------------------------------------------------------------------

def test_sbatch_recipe_runs_the_reference_b0_amp_line_through_srun():
    from image_classification.launcher import build_args
    text = RECIPE.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, flags=re.M))
    assert directives["ntasks-per-node"] == "8" and directives["gpus-per-node"] == "8"
    joined = text.replace("\\\n", " ")
    [srun] = [line for line in joined.splitlines() if line.strip().startswith("srun ")]
    tokens = shlex.split(srun)
    command = tokens[tokens.index("python"):]
    assert " ".join(command[:11]) == ("python ./launch.py --model efficientnet-b0 --precision AMP --mode "
                                      "convergence --platform DGXA100 /imagenet")
    argv = [t.replace("$workspace", "/ws") for t in command[2:]]
    args = build_args(argv)
    assert args.arch == "efficientnet-b0" and args.amp and args.resume == "auto" and args.workspace == "/ws"
    assert args.raport_file == "raport.json"
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if Path(shellcheck).exists():
        result = subprocess.run([shellcheck, "--shell=bash", str(RECIPE)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
