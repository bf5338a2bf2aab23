"""launch.py and configs.yml: every entry builds main.py's arguments, reference values, errors, one CPU run."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import prefork
from image_classification.launcher import cpu_workers_limit, available_configurations, build_args, load_config, \
    resolve_defaults
from image_classification.models import available_models
from reports import by_step, read_report

ROOT = Path(__file__).resolve().parent.parent
MODES = ("convergence", "benchmark_training", "benchmark_training_short", "benchmark_inference", "evaluate")
REFERENCE_BATCH = {  # (model, platform, precision): batch size, from the reference's configs.yml
    ("efficientnet-b0", "T4", "AMP"): 128, ("efficientnet-b0", "T4", "FP32"): 64,
    ("efficientnet-b0", "DGX1V-16G", "AMP"): 128, ("efficientnet-b0", "DGX1V-16G", "FP32"): 64,
    ("efficientnet-b0", "DGX1V-32G", "AMP"): 256, ("efficientnet-b0", "DGX1V-32G", "FP32"): 128,
    ("efficientnet-b0", "DGXA100", "AMP"): 256, ("efficientnet-b0", "DGXA100", "TF32"): 256,
    ("efficientnet-b4", "T4", "AMP"): 32, ("efficientnet-b4", "T4", "FP32"): 16,
    ("efficientnet-b4", "DGX1V-16G", "AMP"): 32, ("efficientnet-b4", "DGX1V-16G", "FP32"): 16,
    ("efficientnet-b4", "DGX1V-32G", "AMP"): 64, ("efficientnet-b4", "DGX1V-32G", "FP32"): 32,
    ("efficientnet-b4", "DGXA100", "AMP"): 128, ("efficientnet-b4", "DGXA100", "TF32"): 64,
}


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT / "configs.yml")


def _argv(model, precision, mode, platform, *rest):
    return ["--model", model, "--precision", precision, "--mode", mode, "--platform", platform, "/data", *rest]


def test_every_entry_builds_main_arguments(config):
    from image_classification.arguments import parse_args
    entries = available_configurations(config)
    assert {m for m, _, _ in entries} == {n for n in available_models()}
    assert {p for _, p, _ in entries} == set(config["platform"])
    for model, platform, precision in entries:
        entry = config["models"][model][platform][precision]
        for mode in MODES:
            args = parse_args(["/data"], defaults=resolve_defaults(model, precision, mode, platform, config))
            assert args.arch == model
            assert args.batch_size == entry["batch_size"]
            assert args.image_size == available_models()[model].default_image_size
            assert args.amp == (precision == "AMP")
            # channels_last with AMP on GPUs, as the reference; on the CPU it is the faster layout in fp32 too
            assert args.memory_format == ("nhwc" if precision == "AMP" or platform == "CPU" else "nchw")
            assert args.optimizer_batch_size % (8 * args.batch_size) == 0 or platform == "CPU"
            for key, value in config["mode"][mode].items():  # the mode section wins
                assert getattr(args, key) == value, (model, platform, precision, mode, key)
            if platform == "CPU":
                assert args.device == "cpu" and args.workers == min(8, cpu_workers_limit()) >= 1


def test_reference_values(config):
    for (model, platform, precision), batch in REFERENCE_BATCH.items():
        for family in ("", "widese-"):
            name = model.replace("efficientnet-", f"efficientnet-{family}")
            assert config["models"][name][platform][precision]["batch_size"] == batch
    args = build_args(_argv("efficientnet-b0", "AMP", "convergence", "DGXA100"))
    expected = dict(optimizer="rmsprop", rmsprop_alpha=0.9, rmsprop_eps=0.01, label_smoothing=0.1, mixup=0.2,
                    lr_schedule="cosine", momentum=0.9, warmup=16, epochs=400, data_backend="pytorch",
                    augmentation="autoaugment", interpolation="bicubic", optimizer_batch_size=4096, lr=0.08,
                    weight_decay=1e-5, image_size=224, batch_size=256, memory_format="nhwc", amp=True,
                    static_loss_scale=128, workers=10, prefetch=4, gpu_affinity="socket_unique_contiguous",
                    print_freq=20, save_checkpoints=True, evaluate=False, training_only=False)
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.model_args.num_classes == 1000
    args = build_args(_argv("efficientnet-b4", "TF32", "benchmark_training_short", "DGXA100"))
    assert (args.lr, args.weight_decay, args.image_size, args.batch_size, args.amp) == (0.16, 5e-6, 380, 64, False)
    assert (args.data_backend, args.prof, args.epochs, args.training_only, args.save_checkpoints) == \
        ("synthetic", 100, 1, True, False)
    assert build_args(_argv("efficientnet-b0", "FP32", "benchmark_inference", "T4")).tf32 is False


def test_command_line_overrides_config():
    args = build_args(_argv("efficientnet-widese-b0", "AMP", "convergence", "DGX1V-16G", "-b", "7", "--lr", "0.5",
                            "--num_classes", "10", "--workspace", "/ws", "--raport-file", "raport.json"))
    assert (args.batch_size, args.lr, args.model_args.num_classes, args.workspace, args.raport_file) == \
        (7, 0.5, 10, "/ws", "raport.json")
    assert args.memory_format == "nhwc" and args.arch == "efficientnet-widese-b0"


@pytest.mark.parametrize("argv,listed", [
    (_argv("efficientnet-b9", "AMP", "convergence", "DGXA100"), "efficientnet-widese-b4"),
    (_argv("efficientnet-b0", "AMP", "convergence", "DGX9"), "DGXH100"),
    (_argv("efficientnet-b0", "TF32", "convergence", "T4"), "available: AMP, FP32"),
    (_argv("efficientnet-b0", "AMP", "training", "T4"), "benchmark_inference"),
    (["--model", "efficientnet-b0", "/data"], "--precision --mode --platform required"),
])
def test_unknown_combination_lists_what_exists(argv, listed, capsys):
    with pytest.raises(SystemExit) as exc:
        build_args(argv)
    assert exc.value.code == 2
    assert listed in capsys.readouterr().err


def test_bad_config_file(tmp_path, capsys):
    from image_classification.launcher import ConfigError
    with pytest.raises(ConfigError, match="cannot read"):  # launch.py: one line, status 1 (a file, not a flag)
        build_args(["--cfg_file", str(tmp_path / "none.yml")] + _argv("efficientnet-b0", "AMP", "convergence", "T4"))
    bad = tmp_path / "bad.yml"
    bad.write_text("precision: {AMP: {amp: True, no_such_flag: 1}}\nplatform: {T4: {}}\nmode: {convergence: {}}\n"
                   "models: {efficientnet-b0: {T4: {AMP: {arch: efficientnet-b0}}}}\n")
    with pytest.raises(SystemExit):
        build_args(["--cfg_file", str(bad)] + _argv("efficientnet-b0", "AMP", "convergence", "T4"))
    assert "no_such_flag" in capsys.readouterr().err


def _training_engine() -> bool:
    return importlib.util.find_spec("image_classification.train") is not None


@pytest.mark.skipif(not _training_engine(), reason="image_classification.train does not exist yet")
@pytest.mark.slow
def test_benchmark_runs_on_cpu_and_reports_latency_percentiles(tmp_path):
    small = ["-b", "2", "--image-size", "32", "--prof", "3", "--optimizer-batch-size", "-1", "--workspace",
             str(tmp_path)]
    train = prefork.run([sys.executable, str(ROOT / "launch.py"), "--model", "efficientnet-b0", "--precision",
                         "FP32", "--mode", "benchmark_training_short", "--platform", "CPU", *small,
                         "--raport-file", "train.json"], cwd=tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    summary = _summary(tmp_path / "train.json")
    assert summary["train.total_ips"] > 0
    # The inference benchmark, as the recipes run it per batch size, and its table.
    from image_classification.launcher import main
    for batch in ("1", "2"):
        main(["--model", "efficientnet-b0", "--precision", "AMP", "--mode", "benchmark_inference", "--platform",
              "CPU", "--data-backend", "synthetic", *small, "-b", batch, "--raport-file", f"raport_{batch}.json"])
    summary = _summary(tmp_path / "raport_2.json")
    for key in ("val.total_ips", "val.compute_latency", "val.compute_latency_at90", "val.compute_latency_at95",
                "val.compute_latency_at99", "val.compute_latency_at100"):
        assert summary[key] > 0, key
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "inference_table.py"),
                            str(tmp_path / "raport_2.json"), str(tmp_path / "raport_1.json")],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "| Batch Size | Throughput Avg | Latency Avg | Latency 90% | Latency 95% | Latency 99% |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1", "2"]
    p99 = 1000 * summary["val.compute_latency_at99"]
    assert lines[3].split("|")[6].strip() == f"{p99:.2f} ms"


def _summary(path: Path) -> dict:
    return by_step(read_report(path))[()]


def test_gpu_platform_settings_on_a_cpu_run_are_fitted_with_a_note():
    from image_classification.launcher import _build, fit_to_cpu
    args, defaults, rest = _build(_argv("efficientnet-b0", "AMP", "convergence", "DGXA100", "--device", "cpu"))
    notes = fit_to_cpu(args, defaults, rest)
    assert args.workers == cpu_workers_limit() and notes == [
        f"workers 10 of this platform: {cpu_workers_limit()} on this CPU run (half the cores, which the model's "
        "compute threads share)"]
    # What the command line asks for itself stays.
    args, defaults, rest = _build(_argv("efficientnet-b0", "AMP", "convergence", "DGXA100", "--device", "cpu",
                                        "-j", "6"))
    assert fit_to_cpu(args, defaults, rest) == [] and args.workers == 6
    config = load_config()
    gpu_decoding = [(m, p, prec) for m, p, prec in available_configurations(config)
                    if config["models"][m][p][prec].get("data_backend") == "dali-gpu"]
    if gpu_decoding:
        model, platform, precision = gpu_decoding[0]
        args, defaults, rest = _build(_argv(model, precision, "convergence", platform, "--device", "cpu"))
        fit_to_cpu(args, defaults, rest)
        assert args.data_backend == "dali-cpu"
