"""The `dali-cpu` and `dali-gpu` backends: NVIDIA DALI pipelines fed with our own per-epoch file order.

Instead of letting fn.readers.file shuffle, the loader computes each epoch's shard order itself (the same
order as the pytorch backend, see folder.shard_indices) and feeds the encoded files batch by batch
through fn.external_source. That makes the data order an exact function of (seed, epoch, rank) and lets
`skip_batches` start mid-epoch on exactly the right files. DALI's own random draws (crop window, flip,
augmentation policy) come from the pipeline seed, which is derived from (seed, epoch, rank, first batch);
an epoch started from its beginning is therefore reproduced exactly, while an epoch resumed mid-way sees
the same images in the same batches but different random crops than the uninterrupted run would have.

Unreadable files: a file that is empty or does not start with the signature of a format DALI decodes is
replaced before it reaches DALI, at no extra I/O since we read the bytes anyway. A file that passes that
check but fails to decode (truncated or corrupt data) makes the pipeline raise; the loader then probes the
batch's files one by one with a one-image DALI decoder, records the failing ones, and rebuilds the
pipeline from that batch on. Replacements follow the pytorch backend's rule (the next readable file in
dataset order, with its label), so both backends give the same batches' files and labels.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..context import ExecutionContext
from .folder import DataError, ImageFolderIndex, epoch_seed, shard_indices, shard_size
from .loader import MAGNITUDE_BINS, MEAN, STD, Batch, Loader

log = logging.getLogger(__name__)

# Leading bytes of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF both byte orders, PNM, WebP,
# JPEG 2000 codestream and file); anything else cannot decode and is replaced up front.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4",
              b"P5", b"P6", b"RIFF", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")


def dali_modules():
    """(fn, types, pipeline_def) from DALI, or a DataError saying how to install it."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        raise DataError(f"--data-backend dali-* needs NVIDIA DALI (pip install nvidia-dali-cuda130): {err}") from None
    return fn, types, pipeline_def


def interp_type(name: str):
    """DALI interpolation for an --interpolation value (DALI antialiases when downscaling, as Pillow does)."""
    _, types, _ = dali_modules()
    modes = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "triangular": types.INTERP_TRIANGULAR}
    if name not in modes:
        raise ValueError(f"--interpolation must be one of {', '.join(modes)}, got {name!r}")
    return modes[name]


def looks_like_image(data: bytes) -> bool:
    """True when `data` starts with the signature of a format DALI can decode (WebP checked past RIFF)."""
    if not data.startswith(SIGNATURES):
        return False
    return not data.startswith(b"RIFF") or data[8:12] == b"WEBP"


def _augment(images, augmentation: str | None, magnitude: int, image_size: int, interp):
    """The --augmentation policy from nvidia.dali.auto_aug on HWC uint8 images."""
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment
    shape = (image_size, image_size)
    if augmentation == "autoaugment":
        return auto_augment.auto_augment_image_net(images, shape=shape, fill_value=128, interp_type=interp)
    if augmentation == "randaugment":
        return rand_augment.rand_augment(images, n=2, m=magnitude, num_magnitude_bins=MAGNITUDE_BINS, shape=shape,
                                         fill_value=128, interp_type=interp)
    if augmentation == "trivialaugment":
        return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=MAGNITUDE_BINS, shape=shape, fill_value=128,
                                                    interp_type=interp)
    raise ValueError(f"--augmentation must be one of autoaugment, randaugment, trivialaugment, got {augmentation!r}")


def _train_graph(source: Callable, *, decoder: str, image_size: int, interp, augmentation: str | None,
                 magnitude: int, layout: str):
    """Decode with a random crop (area 0.08-1, ratio 3/4-4/3), resize to S, flip, augment, normalise."""
    fn, types, _ = dali_modules()
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT64])
    images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                           random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=10)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=interp, antialias=True)
    if augmentation is None:
        mirror = fn.random.coin_flip()
    else:
        # Flip before the policy, as torchvision's transform order does.
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        images = _augment(images, augmentation, magnitude, image_size, interp)
        mirror = 0
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=list(MEAN),
                                      std=list(STD), mirror=mirror)
    return images, labels


def _val_graph(source: Callable, *, decoder: str, image_size: int, interp, augmentation: None, magnitude: int,
               layout: str):
    """Decode, resize the short side to S+32 with torchvision's size rule, centre-crop S, normalise."""
    fn, types, _ = dali_modules()
    from nvidia.dali import math as dmath
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT64])
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    short = float(image_size + 32)
    # torchvision Resize(int): short side -> S+32, long side -> int(S+32 * long / short) (truncated).
    width_is_short = fn.cast(width <= height, dtype=types.FLOAT)
    resize_x = width_is_short * short + (1.0 - width_is_short) * dmath.floor(short * width / height)
    resize_y = (1.0 - width_is_short) * short + width_is_short * dmath.floor(short * height / width)
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = fn.resize(images, resize_x=resize_x, resize_y=resize_y, interp_type=interp, antialias=True)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, crop=(image_size, image_size),
                                      crop_pos_x=_centre_crop_pos(resize_x, image_size),
                                      crop_pos_y=_centre_crop_pos(resize_y, image_size), mean=list(MEAN), std=list(STD))
    return images, labels


def _centre_crop_pos(length, crop: int):
    """crop_pos giving torchvision CenterCrop's offset round((length - crop) / 2), which rounds halves to even.

    DALI rounds half offsets up, a one-pixel shift from torchvision on odd margins; passing the exact
    offset as a fraction of the margin makes both pick the same pixels.
    """
    from nvidia.dali import math as dmath
    margin = length - float(crop)
    odd = margin - 2.0 * dmath.floor(margin / 2.0)
    # margin 2k -> k; margin 2k+1 -> k or k+1, whichever is even (half to even) = 2 * floor((margin+1) / 4)
    offset = odd * 2.0 * dmath.floor((margin + 1.0) / 4.0) + (1.0 - odd) * margin / 2.0
    return offset / dmath.max(margin, 1.0)


def _probe_graph(source: Callable, decoder: str):
    fn, types, _ = dali_modules()
    encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB)


class DaliLoader(Loader):
    """Batches from a DALI pipeline (CPU decoding, or nvJPEG 'mixed' decoding on ctx's GPU)."""

    def __init__(self, index: ImageFolderIndex, *, train: bool, gpu: bool, image_size: int, batch_size: int,
                 ctx: ExecutionContext, workers: int, prefetch: int, interpolation: str,
                 augmentation: str | None, magnitude: int, seed: int) -> None:
        if gpu and not ctx.is_cuda:
            raise RuntimeError("--data-backend dali-gpu needs a CUDA GPU (this run is on "
                               f"{ctx.device.type}); use --data-backend dali-cpu or pytorch")
        num_samples = shard_size(len(index.samples), rank=ctx.rank, world_size=ctx.world_size, equal_shards=train)
        super().__init__(classes=index.classes, batch_size=batch_size, num_samples=num_samples, drop_last=train,
                         ctx=ctx)
        self.index, self.train, self.gpu, self.seed = index, train, gpu, seed
        self.threads, self.prefetch = max(workers, 1), max(prefetch, 1)
        self.graph_options = dict(decoder="mixed" if gpu else "cpu", image_size=image_size,
                                  interp=interp_type(interpolation), augmentation=augmentation,
                                  magnitude=magnitude, layout="HWC" if ctx.channels_last else "CHW")

    # --- order ------------------------------------------------------------------------------------------

    def batches(self, epoch: int, skip_batches: int) -> list[list[int]]:
        """Dataset indices of each batch of the epoch from `skip_batches` on (full batches only when training)."""
        order = shard_indices(len(self.index.samples), epoch=epoch, seed=self.seed, rank=self.ctx.rank,
                              world_size=self.ctx.world_size, shuffle=self.train, equal_shards=self.train)
        size = self.batch_size
        return [order[start:start + size] for start in range(skip_batches * size, len(self) * size, size)
                if start < len(order)]

    # --- reading ----------------------------------------------------------------------------------------

    def _resolve(self, index: int) -> tuple[str, np.ndarray, int]:
        """(path, encoded bytes, label) of sample `index`, or of the next readable file when it is bad."""
        samples = self.index.samples
        for attempt in range(len(samples)):
            path, label = samples[(index + attempt) % len(samples)]
            if path in self._bad:
                continue
            problem = None
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:
                problem = f"cannot read: {err.strerror}"
            else:
                if not data:
                    problem = "empty file"
                elif not looks_like_image(data):
                    problem = "not an image format DALI decodes"
            if problem is None:
                return path, np.frombuffer(data, dtype=np.uint8), label
            self._bad.add(path, problem)
        raise DataError(f"none of the {len(samples)} images under {self.index.root} could be read")

    def _source(self, batches: list[list[int]]) -> Callable:
        def source(info):
            if info.iteration >= len(batches):
                raise StopIteration
            _, encoded, labels = zip(*(self._resolve(index) for index in batches[info.iteration]))
            return list(encoded), np.asarray(labels, dtype=np.int64)
        return source

    # --- pipelines --------------------------------------------------------------------------------------

    def _pipeline(self, batches: list[list[int]], seed: int):
        _, _, pipeline_def = dali_modules()
        graph = _train_graph if self.train else _val_graph
        build = pipeline_def(graph, enable_conditionals=True)
        pipe = build(self._source(batches), batch_size=self.batch_size, num_threads=self.threads,
                     device_id=(self.ctx.device.index or 0) if self.gpu else None, seed=seed % 2**31,
                     prefetch_queue_depth=self.prefetch, **self.graph_options)
        pipe.build()
        return pipe

    def _decodes(self, data: np.ndarray) -> bool:
        """Whether DALI's decoder reads these bytes (a one-image pipeline; only used after a failed batch)."""
        _, _, pipeline_def = dali_modules()
        device_id = (self.ctx.device.index or 0) if self.gpu else None
        pipe = pipeline_def(_probe_graph)(lambda: [data], decoder=self.graph_options["decoder"], batch_size=1,
                                          num_threads=1, device_id=device_id)
        try:
            pipe.build()
            pipe.run()
            return True
        except RuntimeError:
            return False
        finally:
            del pipe

    def _find_bad_files(self, batch: list[int]) -> int:
        """Probe the files a failed batch was built from; record those DALI cannot decode; return how many."""
        found = 0
        for index in batch:
            path, data, _ = self._resolve(index)
            if not self._decodes(data):
                self._bad.add(path, "DALI could not decode it")
                found += 1
        return found

    # --- iteration --------------------------------------------------------------------------------------

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[Batch]:
        return self._gpu_batches(epoch, skip_batches) if self.gpu else self._host_batches(epoch, skip_batches)

    def _run_batches(self, epoch: int, skip_batches: int) -> Iterator[tuple]:
        """DALI outputs batch by batch; a decode failure is diagnosed and the pipeline rebuilt after it."""
        batches = self.batches(epoch, skip_batches)
        done = 0
        while done < len(batches):
            first = skip_batches + done
            pipe = self._pipeline(batches[done:], epoch_seed(self.seed, epoch, self.ctx.rank, first))
            try:
                while done < len(batches):
                    try:
                        outputs = pipe.run()
                    except RuntimeError as err:
                        if not self._find_bad_files(batches[done]):
                            raise
                        log.info("rebuilding the DALI pipeline after a decode failure in batch %d", first)
                        break
                    done += 1
                    yield outputs
            finally:
                del pipe

    def _host_batches(self, epoch: int, skip_batches: int) -> Iterator[Batch]:
        # DALI has normalised already; a GPU run with CPU decoding only needs the copy.
        for images, labels in self._run_batches(epoch, skip_batches):
            images = self._images(images, torch.device("cpu"))
            yield self.ctx.to_device(images), self.ctx.to_device(self._labels(labels))

    def _gpu_batches(self, epoch: int, skip_batches: int) -> Iterator[Batch]:
        # DALI already normalised on the GPU: no prefetcher needed, DALI's queue overlaps the work.
        for images, labels in self._run_batches(epoch, skip_batches):
            yield self._images(images, self.ctx.device), self.ctx.to_device(self._labels(labels))

    def _images(self, tensor_list, device: torch.device) -> torch.Tensor:
        """DALI's dense float batch as a torch tensor on `device` in the run's memory format."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        if self.graph_options["layout"] == "HWC":
            return out.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: exactly channels_last
        return out

    @staticmethod
    def _labels(tensor_list) -> torch.Tensor:
        return torch.from_numpy(np.array(tensor_list.as_tensor(), dtype=np.int64).reshape(-1))
