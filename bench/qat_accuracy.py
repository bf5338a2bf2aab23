#!/usr/bin/env python3
"""Top-1 of an EfficientNet in float, after INT8 calibration only, and after N epochs of QAT.

The reference's table (ImageNet, 224/380 px) gives the float → QAT gap: 0.51 for b0, 0.44 for b4.
This bench measures the same three numbers at small scale on a CPU, on a generated data set whose
classes are learnable (the project's default, image_classification.data.generated): float weights
(the main job's, or trained here from scratch) are loaded into efficientnet-quant-<v>, calibrated with
each calibrator, and the default (histogram) one is fine-tuned with QAT. Images go through the validation
preprocessing for every step here, QAT included. --engines then exports the float model and the QAT model
(Q/DQ, BatchNorm folded as model2onnx.py --fold-batchnorm does) and measures both files' top-1 in each
engine of classify.py --engine, so that INT8 is compared with the same model's float export in the same engine.

    bash scripts/demo.sh && .venv/bin/python bench/qat_accuracy.py --float-weights runs/demo/model_best.pth.tar
    .venv/bin/python bench/qat_accuracy.py                      # trains the float b0 here first
    .venv/bin/python bench/qat_accuracy.py --data DIR --image-size 64 --json results.json
    .venv/bin/python bench/qat_accuracy.py --engines onnxruntime,openvino     # also top-1 in each engine
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification.data.generated import generate_dataset  # noqa: E402
from image_classification.models import get_entry  # noqa: E402
from image_classification.models.quantized import CALIBRATORS  # noqa: E402
from image_classification.toolkit.quantization import calibrate  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def image_folder(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder tree as one normalised tensor (resize to size+32, centre crop: the validation pipeline)."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize(size + 32), transforms.CenterCrop(size), transforms.ToTensor()])
    data = datasets.ImageFolder(str(root), transform=tf)
    images = torch.stack([image for image, _ in data])
    return (images - MEAN) / STD, torch.tensor(data.targets)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


def engine_top1(engine, data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> float:
    """Top-1 of an image_classification.deploy.engines engine on normalised images."""
    correct = sum(int((engine.run(x.numpy()).argmax(1) == y.numpy()).sum())
                  for x, y in batches(*data, batch_size, shuffle=False))
    return 100.0 * correct / len(data[1])


def without_quantizers(qat: torch.nn.Module, arch: str, params: dict) -> torch.nn.Module:
    """The float network holding the QAT model's weights and BN statistics: the same model as the INT8 file,
    without its quantizers (their `_amax` ranges are the only other state)."""
    model = get_entry(f"efficientnet-{arch}")(**params)
    model.load_state_dict({k: v for k, v in qat.state_dict().items() if not k.endswith("._amax")})
    return model.eval()


def engines_table(models: dict[str, torch.nn.Module], qat: torch.nn.Module, engines: list[str], data,
                  image_size: int, batch_size: int) -> dict[str, dict[str, float]]:
    """Top-1 in each engine of each float model's ONNX export (by name) and of the QAT model's Q/DQ export."""
    from image_classification.deploy.batchnorm_folding import fold_batchnorm
    from image_classification.deploy.engines import open_engine
    from image_classification.deploy.export import export_onnx
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: export_onnx(model.eval(), Path(tmp) / f"{name}.onnx", image_size=image_size)
                 for name, model in models.items()}
        files["int8"] = export_onnx(fold_batchnorm(qat), Path(tmp) / "int8.onnx", image_size=image_size)
        for name in engines:
            table[name] = {precision: engine_top1(open_engine(name, path), data, batch_size)
                           for precision, path in files.items()}
            print(f"{name}: " + ", ".join(f"{k} top-1 {v:.2f}" for k, v in table[name].items()), flush=True)
    return table


@torch.no_grad()
def top1(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches(*data, batch_size, shuffle=False))
    return 100.0 * correct / len(data[1])


def train(model: torch.nn.Module, data, epochs: int, lr: float, batch_size: int, weight_decay: float,
          label: str) -> None:
    """SGD with momentum 0.9 and a per-epoch cosine schedule, as the reference's quant-b0 recipe."""
    decay = [p for n, p in model.named_parameters() if "bn" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bn" in n]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * epoch / epochs)) * lr
        model.train()
        start, total = time.perf_counter(), 0.0
        for step, (x, y) in enumerate(batches(*data, batch_size, shuffle=True, seed=epoch)):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"  {label} epoch {epoch + 1}/{epochs}: loss {total / (step + 1):.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="b0", help="member: b0 … b7 (default: %(default)s)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "generated",
                   help="ImageFolder tree with train/ and val/ (default: %(default)s, generated if missing)")
    p.add_argument("--float-weights", type=Path, default=None,
                   help="float weights or a main.py checkpoint of efficientnet-<arch> (default: train them here)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--float-epochs", type=int, default=12)
    p.add_argument("--float-lr", type=float, default=0.05)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=0.0125 / 128 * 32, help="the quant-b0 recipe's lr per image × batch")
    p.add_argument("--weight-decay", type=float, default=4.5e-5)
    p.add_argument("--calibration-batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="", help="comma-separated: also top-1 of the float and QAT exports in these "
                   "engines (onnxruntime, openvino; default: none)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if not (args.data / "train").is_dir():
        generate_dataset(args.data)
    train_data, val_data = image_folder(args.data / "train", args.image_size), \
        image_folder(args.data / "val", args.image_size)
    num_classes = int(train_data[1].max()) + 1
    # BatchNorm momentum 0.1: the reference's 0.01 needs far more steps than this bench takes to settle.
    params = {"num_classes": num_classes, "bn_momentum": 0.1, "trt": True}
    print(f"efficientnet-{args.arch} at {args.image_size} px: {len(train_data[1])} train / {len(val_data[1])} val "
          f"images, {num_classes} classes", flush=True)

    engines = [name for name in args.engines.split(",") if name]
    unknown = set(engines) - {"onnxruntime", "openvino"}
    if unknown:
        p.error(f"--engines: unknown {sorted(unknown)}; use onnxruntime, openvino")
    if args.float_weights is not None:
        model = get_entry(f"efficientnet-{args.arch}")(pretrained_from_file=str(args.float_weights), **params)
    else:
        model = get_entry(f"efficientnet-{args.arch}")(**params)
        train(model, train_data, args.float_epochs, args.float_lr, args.batch_size, args.weight_decay, "float")
    results = {"float": top1(model, val_data, args.batch_size)}
    print(f"float top-1 {results['float']:.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "float.pth"
        torch.save(model.state_dict(), weights)
        calibrated = {}
        for calibrator in CALIBRATORS:
            quant = get_entry(f"efficientnet-quant-{args.arch}")(pretrained_from_file=str(weights), **params)
            calibrate(quant, batches(*train_data, args.batch_size, shuffle=True, seed=1000),
                      num_batches=args.calibration_batches, calibrator=calibrator)
            results[f"calibrated_{calibrator}"] = top1(quant, val_data, args.batch_size)
            print(f"calibrated ({calibrator}) top-1 {results[f'calibrated_{calibrator}']:.2f}", flush=True)
            calibrated[calibrator] = quant
    qat = calibrated["histogram"]
    train(qat, train_data, args.qat_epochs, args.qat_lr, args.batch_size, args.weight_decay, "QAT")
    results["qat"] = top1(qat, val_data, args.batch_size)
    results["qat_epochs"] = args.qat_epochs

    print("\n| model | float top-1 | calibrated: histogram (reference) | max | percentile 99.9 | "
          f"QAT {args.qat_epochs} epochs | gap float - QAT |")
    print("|---|---|---|---|---|---|---|")
    print(f"| efficientnet-quant-{args.arch} ({args.image_size} px) | {results['float']:.2f} | "
          f"{results['calibrated_histogram']:.2f} | {results['calibrated_max']:.2f} | "
          f"{results['calibrated_percentile']:.2f} | {results['qat']:.2f} | {results['float'] - results['qat']:.2f} |")
    if engines:
        # fp32: the float model QAT started from; qat_fp32: the QAT model's own weights without quantizers, the
        # float twin of the INT8 file, so INT8 - qat_fp32 is what quantization alone costs in that engine.
        qat_float = without_quantizers(qat, args.arch, params)
        results["engines"] = {"torch": {"fp32": results["float"], "qat_fp32": top1(qat_float, val_data,
                                                                                      args.batch_size),
                                        "int8": results["qat"]},
                              **engines_table({"fp32": model, "qat_fp32": qat_float}, qat, engines, val_data,
                                              args.image_size, args.batch_size)}
        print("\n| engine | fp32 top-1 (before QAT) | QAT weights, fp32 | QAT INT8 | INT8 - QAT fp32 |")
        print("|---|---|---|---|---|")
        for name, row in results["engines"].items():
            print(f"| {name} | {row['fp32']:.2f} | {row['qat_fp32']:.2f} | {row['int8']:.2f} | "
                  f"{row['int8'] - row['qat_fp32']:+.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
