"""The `dali-cpu` and `dali-gpu` backends: NVIDIA DALI pipelines fed with our own per-epoch file order.

Instead of letting fn.readers.file shuffle, the loader computes each epoch's shard order itself (the same
order as the pytorch backend, see the index's epoch_order) and feeds the encoded files (or tar shard
members, see webdataset.py) batch by batch through fn.external_source. That makes the data order an exact
function of (seed, epoch, rank) and lets `skip_batches` start mid-epoch on exactly the right files. DALI's own random draws (crop window, flip,
augmentation policy) come from the pipeline seed, derived from (seed, epoch, rank, first batch), so an
epoch started from its beginning is reproduced exactly; that is why each training epoch builds its own
pipeline, while validation, which draws nothing at random, keeps one pipeline for all its passes. A
training epoch resumed mid-way is exact too: training pipelines run with DALI checkpointing on,
`state_dict()` saves the checkpoint taken after the last batch handed out (its random generators' states,
a few KiB) and the resumed loader rebuilds the pipeline from it, so the batches after a resume equal the
uninterrupted run's bit for bit.

Geometry: the reference's DALI pipelines' (HybridTrainPipe, HybridValPipe), operator for operator:
training decodes whole images, then fn.random_resized_crop (area 0.08-1, ratio 3/4-4/3, 100 attempts,
no antialiasing), and flips; validation resizes the short side to S+32 (or round(S / --eval-crop-pct)) with
DALI's rounding and no antialiasing, then crops the centre. So dali-* validation is not the pytorch
backend's (torchvision's antialiased Resize and half-to-even centre crop), exactly as the reference's two
backends differ.

Batches: dali-gpu normalises on the GPU inside DALI. dali-cpu decodes, crops, flips, resizes and augments
on the CPU; on a GPU run it hands out uint8 batches, copied from pinned memory on a side stream and
normalised on the GPU (as the reference did, and as the pytorch backend does), and on a CPU run it
normalises in DALI's threads (see normalizes_in_pipeline).

Interpolation: --interpolation is the filter of the crop's and the validation's resize. --augmentation
autoaugment is the reference's policy_v0 with Pillow's own filters (dali_autoaugment.py); randaugment and
trivialaugment are nvidia.dali.auto_aug's, whose shear, translate and rotate filter linearly whatever
--interpolation says (DALI's warp_affine has no other smooth filter). autoaugment-paper (torchvision's
policy) has no DALI implementation and is refused.

Unreadable files: a file that is empty, does not start with the signature of a format DALI decodes, or
whose header claims more pixels than Pillow would decode (a decompression bomb: over 2 x
PIL.Image.MAX_IMAGE_PIXELS) never reaches DALI, at no extra I/O since we read the bytes anyway. A file
that passes those checks but fails to decode (truncated or corrupt data) makes the pipeline's decoder
raise; the loader then probes the batch's files one by one with a one-image DALI decoder, records the
failing ones, and rebuilds the pipeline from that batch on. A failure of any other step is raised at once.
Training replaces an unreadable file by the next readable file in dataset order (with its label) and
validation drops it, as the pytorch backend does, so both backends give the same batches' files and labels.

16-bit PNGs: DALI's decoder scales them to 8 bits as round(v / 257), which the pytorch backend matches.
"""
from __future__ import annotations

import io
import logging
import re
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..cli import UserError
from ..context import ExecutionContext
from .augmentations import POLICIES, available
from .folder import (DROPPED, REPLACED, DataError, ImageFolderIndex, UnreadableSample, epoch_samples, epoch_seed,
                     shard_size)
from .loader import MAGNITUDE_BINS, MEAN, STD, Batch, Loader, Triple, device_batches, val_resize_size

if TYPE_CHECKING:
    from . import LoaderOptions

log = logging.getLogger(__name__)

# Leading bytes of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF both byte orders, PNM, WebP,
# JPEG 2000 codestream and file); anything else cannot decode and is replaced up front.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4",
              b"P5", b"P6", b"RIFF", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")


# The --augmentation policies DALI runs (autoaugment-paper is torchvision's, on the pytorch backend only).
DALI_AUGMENTATIONS = tuple(available("dali"))


def dali_modules():
    """(fn, types, pipeline_def) from DALI, or a DataError saying how to install it."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        raise DataError(f"--data-backend dali-* needs NVIDIA DALI (pip install nvidia-dali-cuda130): {err}") from None
    return fn, types, pipeline_def


def interp_type(name: str):
    """DALI interpolation for an --interpolation value (the reference's mapping; its resizes do not antialias)."""
    _, types, _ = dali_modules()
    modes = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "triangular": types.INTERP_TRIANGULAR}
    if name not in modes:
        raise UserError(f"--interpolation must be one of {', '.join(modes)}, got {name!r}")
    return modes[name]


def looks_like_image(data: bytes) -> bool:
    """True when `data` starts with the signature of a format DALI can decode (WebP checked past RIFF)."""
    if not data.startswith(SIGNATURES):
        return False
    return not data.startswith(b"RIFF") or data[8:12] == b"WEBP"


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header (a few microseconds, no decoding), or None for other data."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment of a JPEG."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            if pos + 9 > len(data):
                return None
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def unusable(data: bytes) -> str | None:
    """Why encoded bytes must not reach DALI's decoder, or None when they may."""
    if not data:
        return "empty file"
    if not looks_like_image(data):
        return "not an image format DALI decodes"
    return decompression_bomb(data)


def decompression_bomb(data: bytes) -> str | None:
    """Pillow's decompression-bomb rule (more than 2 x PIL.Image.MAX_IMAGE_PIXELS is refused) applied to the
    header's size, so that DALI never allocates for such a file and both backends refuse the same files."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return None
    size = header_size(data)
    if size is None:  # formats other than PNG and JPEG: Pillow reads the header (and applies the rule)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                size = Image.open(io.BytesIO(data)).size
        except Image.DecompressionBombError as err:
            return f"DecompressionBombError: {err}"
        except Exception:  # noqa: BLE001 - a header Pillow cannot read: DALI's decoder will judge the file
            return None
    pixels = size[0] * size[1]
    if pixels > 2 * limit:
        return (f"DecompressionBombError: {size[0]}x{size[1]} = {pixels} pixels, over twice "
                f"PIL.Image.MAX_IMAGE_PIXELS ({2 * limit} pixels)")
    return None


def _augment(images, augmentation: str, magnitude: int, image_size: int):
    """The --augmentation policy on HWC uint8 images (an entry of augmentations.POLICIES)."""
    return POLICIES.get(augmentation).implementation(augmentation, "dali")(images, magnitude, image_size)


# --augmentation's DALI graphs (policy_v0's is dali_autoaugment.autoaugment). The policies' shear, translate and
# rotate run fn.warp_affine, which only has nearest and linear filters (it fails at the first batch on cubic or
# triangular): --interpolation applies to the resize, and the policy's geometric operations are always linear.

def randaugment(images, magnitude: int, image_size: int):
    from nvidia.dali.auto_aug import rand_augment
    return rand_augment.rand_augment(images, n=2, m=magnitude, num_magnitude_bins=MAGNITUDE_BINS,
                                     **_warp_options(image_size))


def trivialaugment(images, magnitude: int, image_size: int):
    from nvidia.dali.auto_aug import trivial_augment
    return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=MAGNITUDE_BINS,
                                                **_warp_options(image_size))


def _warp_options(image_size: int) -> dict:
    _, types, _ = dali_modules()
    return dict(shape=(image_size, image_size), fill_value=128, interp_type=types.INTERP_LINEAR)


def random_resized_crop(images, image_size: int, interp):
    """The reference's HybridTrainPipe crop of whole decoded images: area 0.08-1, ratio 3/4-4/3, 100 attempts
    (then the centre crop DALI falls back to), resized to S x S without antialiasing."""
    fn, _, _ = dali_modules()
    return fn.random_resized_crop(images, size=[image_size, image_size], interp_type=interp,
                                  random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4.0 / 3.0], num_attempts=100,
                                  antialias=False)


def resize_shorter(images, resize_size: int, interp):
    """The reference's HybridValPipe resize: the short side to `resize_size`, the long side by DALI's rounding
    of the same scale (which it keeps exactly, sub-pixel), without antialiasing."""
    fn, _, _ = dali_modules()
    return fn.resize(images, resize_shorter=resize_size, interp_type=interp, antialias=False)


def _crop_mirror_normalize(images, *, normalize: bool, layout: str, mean: Triple, std: Triple, **crop_and_mirror):
    """The last step: float32 normalised by `mean`/`std`, or (`normalize` off) uint8 for the run's device to
    normalise; either in `layout` (HWC or CHW)."""
    fn, types, _ = dali_modules()
    if normalize:
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=list(mean),
                                        std=list(std), **crop_and_mirror)
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout, **crop_and_mirror)


def _train_graph(source: Callable, *, decoder: str, image_size: int, interp, augmentation: str | None,
                 magnitude: int, layout: str, normalize: bool, mean: Triple, std: Triple):
    """The reference's HybridTrainPipe: decode, random-resized crop, flip, normalise; a policy after the flip."""
    fn, types, _ = dali_modules()
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT64])
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = random_resized_crop(images, image_size, interp)
    if augmentation is None:
        mirror = fn.random.coin_flip()  # in crop_mirror_normalize, as the reference
    else:
        # The reference runs its policy only on the pytorch backend, after the crop and the flip: here too.
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        images = _augment(images, augmentation, magnitude, image_size)
        mirror = 0
    return _crop_mirror_normalize(images, normalize=normalize, layout=layout, mean=mean, std=std,
                                  mirror=mirror), labels


def _val_graph(source: Callable, *, decoder: str, image_size: int, resize_size: int, interp, augmentation: None,
               magnitude: int, layout: str, normalize: bool, mean: Triple, std: Triple):
    """The reference's HybridValPipe: decode, resize the short side to `resize_size`, centre-crop S, normalise."""
    fn, types, _ = dali_modules()
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT64])
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    images = resize_shorter(images, resize_size, interp)
    # DALI's centre crop: offset round((length - S) / 2) with halves rounded up, as the reference's.
    images = _crop_mirror_normalize(images, normalize=normalize, layout=layout, mean=mean, std=std,
                                    crop=(image_size, image_size))
    return images, labels


# DALI's error text names the operator that failed; only a decoder's failure can be blamed on a file.
DECODER_FAILURE = re.compile(r"Error in \w+ operator `nvidia\.dali\.fn\.decoders\.\w+`")


def is_decode_failure(err: Exception) -> bool:
    """Whether a pipeline error came from decoding (a bad file is to be found) rather than any other step."""
    return DECODER_FAILURE.search(str(err)) is not None


def shutdown(pipe) -> None:
    """Stop a pipeline's executor threads now, in the process that started them.

    DALI stops them in `Pipeline.__del__`. Left to the garbage collector, that may run in a forked child (a
    DataLoader worker) that inherited the pipeline but not its threads, where the executor's destructor waits
    for them forever. `_shutdown` is that destructor's body; afterwards the object holds no threads.
    """
    pipe._shutdown()


def _probe_graph(source: Callable, decoder: str):
    fn, types, _ = dali_modules()
    encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB)


def normalizes_in_pipeline(gpu: bool, ctx: ExecutionContext) -> bool:
    """Whether DALI hands out normalised float32 batches, rather than uint8 ones that ctx's device normalises.

    dali-gpu normalises in its own GPU pipeline. dali-cpu feeding a GPU hands out uint8 (a quarter of the
    bytes), which device_batches copies from pinned memory on a side stream and normalises on the GPU, as
    for the pytorch backend. dali-cpu on a CPU run normalises in DALI's threads, which overlap the training
    step: with uint8 the consumer's thread would do that work, measured 0-20 % slower per batch (32 images
    at 224 px, 2 cores, a 40 ms stand-in step).
    """
    return gpu or not ctx.is_cuda


class DaliLoader(Loader):
    """Batches from a DALI pipeline (CPU decoding, or nvJPEG 'mixed' decoding on ctx's GPU)."""

    def __init__(self, index: ImageFolderIndex, *, train: bool, gpu: bool, image_size: int, batch_size: int,
                 ctx: ExecutionContext, workers: int, prefetch: int, interpolation: str,
                 augmentation: str | None, magnitude: int, seed: int, crop_pct: float | None = None,
                 repeats: int = 1, mean: Triple = MEAN, std: Triple = STD) -> None:
        if gpu and not ctx.is_cuda:
            raise UserError("--data-backend dali-gpu needs a CUDA GPU (this run is on "
                               f"{ctx.device.type}); use --data-backend dali-cpu or pytorch")
        if augmentation is not None:  # refused here, naming the backends that run it, not at the first batch
            POLICIES.get(augmentation).implementation(augmentation, "dali")
        num_samples = shard_size(len(index.samples), rank=ctx.rank, world_size=ctx.world_size, equal_shards=train)
        super().__init__(classes=index.classes, batch_size=batch_size, num_samples=num_samples, drop_last=train,
                         ctx=ctx, mean=mean, std=std)
        self.index, self.train, self.gpu, self.seed, self.repeats = index, train, gpu, seed, repeats
        self.threads, self.prefetch = max(workers, 1), max(prefetch, 1)
        self.graph_options = dict(decoder="mixed" if gpu else "cpu", image_size=image_size,
                                  interp=interp_type(interpolation), augmentation=augmentation,
                                  magnitude=magnitude, layout="HWC" if ctx.channels_last else "CHW",
                                  normalize=normalizes_in_pipeline(gpu, ctx), mean=mean, std=std)
        if not train:
            self.graph_options["resize_size"] = val_resize_size(image_size, crop_pct)
        # (DALI checkpoint after the last batch handed out, the batch its pipeline started at), for state_dict()
        # after the consumer stops mid-epoch; None outside a training epoch.
        self._resume_point: tuple[bytes, int] | None = None
        # The validation pipeline and the batches it was built for, after a whole pass: the next pass reuses it.
        self._kept: tuple[object, list[list[int]]] | None = None
        self._unreadable: dict[int, int] = {}  # batch number -> unreadable samples, from feeding to handing out

    # --- order ------------------------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[int]]:
        """Dataset indices of each batch of the epoch (full batches only when training)."""
        # The repeats of --repeated-augment differ by DALI's own draws, which go on from sample to sample.
        order = [index for index, _ in epoch_samples(self.index, epoch=epoch, seed=self.seed, rank=self.ctx.rank,
                                                     world_size=self.ctx.world_size, train=self.train,
                                                     repeats=self.repeats)]
        size = self.batch_size
        return [order[start:start + size] for start in range(0, len(self) * size, size) if start < len(order)]

    # --- reading ----------------------------------------------------------------------------------------

    def _read(self, index: int) -> tuple[str, np.ndarray, int] | None:
        """(path, encoded bytes, label) of sample `index`, or None (recorded) when its file is unusable."""
        path, label = self.index.samples[index]
        if path in self._bad:
            return None
        try:
            data = self.index.read(index)
        except UnreadableSample as err:
            problem = str(err)
        else:
            problem = unusable(data)
        if problem is None:
            return path, np.frombuffer(data, dtype=np.uint8), label
        self._bad.add(path, problem, REPLACED if self.train else DROPPED)
        return None

    def _resolve(self, index: int) -> tuple[tuple[str, np.ndarray, int] | None, bool]:
        """(what to feed for sample `index`, whether its own file was unusable).

        Training feeds the next usable file in dataset order instead of an unusable one; validation feeds
        nothing (None).
        """
        sample = self._read(index)
        if sample is not None or not self.train:
            return sample, sample is None
        samples = self.index.samples
        for attempt in range(1, len(samples)):
            sample = self._read((index + attempt) % len(samples))
            if sample is not None:
                return sample, True
        raise DataError(f"none of the {len(samples)} images under {self.index.root} could be read")

    def _source(self, batches: list[list[int]], first: int) -> Callable:
        # The pipeline holds the source: a strong reference back to the loader would make loader and kept
        # pipeline a cycle, left to the garbage collector when a user drops the loader without close().
        loader = weakref.proxy(self)

        def source(info):
            # DALI numbers iterations from the pipeline's first batch, also after restoring a checkpoint.
            number = first + info.iteration
            if number >= len(batches):
                raise StopIteration
            encoded, labels, unreadable = [], [], 0
            for index in batches[number]:
                sample, bad = loader._resolve(index)
                unreadable += bad
                if sample is not None:
                    encoded.append(sample[1])
                    labels.append(sample[2])
            loader._unreadable[number] = unreadable
            return encoded, np.asarray(labels, dtype=np.int64)
        return source

    # --- pipelines --------------------------------------------------------------------------------------

    def _pipeline(self, batches: list[list[int]], first: int, seed: int, checkpoint: bytes | None = None):
        _, _, pipeline_def = dali_modules()
        graph = _train_graph if self.train else _val_graph
        # Checkpointing only tracks the random generators' states ("no impact on performance" per DALI's
        # documentation); validation has no random draws to track.
        build = pipeline_def(graph, enable_conditionals=True, enable_checkpointing=self.train)
        pipe = build(self._source(batches, first), batch_size=self.batch_size, num_threads=self.threads,
                     device_id=(self.ctx.device.index or 0) if self.gpu else None, seed=seed % 2**31,
                     prefetch_queue_depth=self.prefetch, checkpoint=checkpoint, **self.graph_options)
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
            shutdown(pipe)

    def _find_bad_files(self, batch: list[int]) -> int:
        """Probe the files a failed batch was built from; record those DALI cannot decode; return how many."""
        found = 0
        for index in batch:
            sample, _ = self._resolve(index)
            if sample is not None and not self._decodes(sample[1]):
                self._bad.add(sample[0], "DALI could not decode it", REPLACED if self.train else DROPPED)
                found += 1
        return found

    # --- resume -----------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Loader.set_epoch; forgets the resume point of the previous selection."""
        super().set_epoch(epoch, skip_batches)
        self._resume_point = None  # a pipeline of the previous selection describes nothing resumable now

    def state_dict(self) -> dict:
        """Loader.state_dict() plus, mid-way through a training epoch, the DALI checkpoint of the pipeline after
        the last batch handed out ("dali_checkpoint", bytes: 392 B without --augmentation, 4-8 KiB with a
        policy, whatever the batch size) and the batch that pipeline started at ("dali_first_batch")."""
        state = super().state_dict()
        if self._resume_point is not None:
            state["dali_checkpoint"], state["dali_first_batch"] = self._resume_point
        return state

    def close(self) -> None:
        """Shut down the kept validation pipeline (its threads and buffers)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            shutdown(kept[0])

    # --- iteration --------------------------------------------------------------------------------------

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[tuple[Batch, int]]:
        if self.graph_options["normalize"]:
            yield from self._normalised_batches(epoch, skip_batches)
        else:
            # device_batches runs a batch ahead on a GPU, so each batch's count and resume point wait in a queue
            # until that batch is handed out.
            pending: deque[tuple[int, tuple[bytes, int] | None]] = deque()
            for batch in device_batches(self._host_batches(epoch, skip_batches, pending), self.ctx, self.mean,
                                        self.std):
                unreadable, self._resume_point = pending.popleft()
                yield batch, unreadable
        self._resume_point = None  # the epoch is complete: nothing left to resume

    def _normalised_batches(self, epoch: int, skip_batches: int) -> Iterator[tuple[Batch, int]]:
        """DALI's float batches, on ctx's device already (dali-gpu, or dali-cpu on a CPU run); DALI's queue
        overlaps the work, no prefetcher needed."""
        for number, (images, labels), resume_point in self._run_batches(epoch, skip_batches):
            unreadable = self._unreadable.pop(number, 0)
            self._resume_point = resume_point
            if len(labels) == 0:  # a validation batch whose every file was dropped (DALI cannot densify it)
                yield (torch.empty(0), torch.empty(0, dtype=torch.int64)), unreadable
                continue
            images = self._to_torch(images, torch.float32, self.ctx.device)
            yield (images, self.ctx.to_device(self._labels(labels))), unreadable

    def _host_batches(self, epoch: int, skip_batches: int, pending: deque) -> Iterator[Batch]:
        """dali-cpu: uint8 [B,3,S,S] batches in host memory (pinned on a GPU run) for device_batches."""
        pin = self.ctx.pin_memory()
        for number, (images, labels), resume_point in self._run_batches(epoch, skip_batches):
            pending.append((self._unreadable.pop(number, 0), resume_point))
            if len(labels) == 0:  # a validation batch whose every file was dropped (DALI cannot densify it)
                size = self.graph_options["image_size"]
                yield torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
                continue
            images, labels = self._to_torch(images, torch.uint8, torch.device("cpu"), pin), self._labels(labels)
            yield images, labels.pin_memory() if pin else labels

    def _run_batches(self, epoch: int, skip_batches: int
                     ) -> Iterator[tuple[int, tuple, tuple[bytes, int] | None]]:
        """(batch number, DALI outputs, training resume point) from `skip_batches` on; a decode failure is
        diagnosed and the pipeline rebuilt from the failed batch, any other failure raised at once."""
        batches = self.batches(epoch)
        self._unreadable.clear()
        resumed = self._resumed if self._resumed is not None and "dali_checkpoint" in self._resumed else None
        number = skip_batches
        while number < len(batches):
            pipe, first = self._start(batches, epoch, number, resumed)
            resumed = None
            try:
                while number < len(batches):
                    try:
                        outputs = pipe.run()
                    except RuntimeError as err:
                        if not is_decode_failure(err) or not self._find_bad_files(batches[number]):
                            raise
                        log.info("rebuilding the DALI pipeline after a decode failure in batch %d", number)
                        break
                    number += 1
                    if not self.train and first == 0 and number == len(batches):
                        self._kept = pipe, batches
                    # Taken now (10-200 us), not at state_dict(): on a GPU run the consumer is a batch behind.
                    yield number - 1, outputs, (pipe.checkpoint(), first) if self.train else None
            finally:  # also when the consumer stops early (--prof, a signal) and the generator is closed
                if self._kept is None or self._kept[0] is not pipe:
                    shutdown(pipe)

    def _start(self, batches: list[list[int]], epoch: int, number: int, resumed: dict | None) -> tuple[object, int]:
        """(pipeline, the batch it starts at) for iterating from batch `number` on.

        A training pipeline is built for each epoch (or restored from the resumed state): its random draws are
        seeded by (seed, epoch, rank, first batch), so that any epoch started from its beginning is the same
        whatever ran before it. DALI cannot reseed a built pipeline, and building costs ~10 ms on a CPU
        without --augmentation and 0.7-1.1 s with a policy (tracing its conditional graph in Python; measured
        at 32 px, batch 4). Validation has no random draws: the pipeline of a whole pass is kept and rewound
        for the next pass, sparing the decoders' set-up (seconds with nvJPEG on a GPU).
        """
        if resumed is not None:
            pipe = self._restored_pipeline(batches, epoch, resumed)
            if pipe is not None:
                return pipe, resumed["dali_first_batch"]
        kept, self._kept = self._kept, None
        if kept is not None and number == 0 and kept[1] == batches and self._rewind(kept[0]):
            return kept[0], 0
        if kept is not None:  # a kept pipeline that does not fit is shut down before its successor is built
            shutdown(kept[0])
        return self._pipeline(batches, number, epoch_seed(self.seed, epoch, self.ctx.rank, number)), number

    @staticmethod
    def _rewind(pipe) -> bool:
        """Bring a pipeline that has handed out its whole epoch back to its first batch; False when it cannot."""
        try:
            pipe.run()  # after the last batch: the source's StopIteration, which reset() needs to have seen
        except StopIteration:
            pipe.reset()
            return True
        return False

    def _restored_pipeline(self, batches: list[list[int]], epoch: int, state: dict):
        """The pipeline state_dict() saved, rebuilt from its DALI checkpoint; None when the graph has changed."""
        first = state["dali_first_batch"]
        try:
            return self._pipeline(batches, first, epoch_seed(self.seed, epoch, self.ctx.rank, first),
                                  state["dali_checkpoint"])
        except RuntimeError as err:  # e.g. another --augmentation than the interrupted run's
            log.warning("cannot restore the DALI pipeline of the interrupted run (%s); epoch %d continues with "
                        "other random crops and augmentations than it would have had", str(err).splitlines()[0],
                        epoch)
            return None

    def _to_torch(self, tensor_list, dtype: torch.dtype, device: torch.device, pin: bool = False) -> torch.Tensor:
        """DALI's dense image batch as a [B,3,S,S] torch tensor on `device`: NCHW, or NHWC storage for HWC."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=dtype, device=device, pin_memory=pin)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        if self.graph_options["layout"] == "HWC":
            return out.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: exactly channels_last
        return out

    @staticmethod
    def _labels(tensor_list) -> torch.Tensor:
        return torch.from_numpy(np.array(tensor_list.as_tensor(), dtype=np.int64).reshape(-1))


def build_cpu_loader(index: ImageFolderIndex, options: LoaderOptions) -> DaliLoader:
    """The `dali-cpu` entry of DATA_BACKENDS: CPU decoding."""
    return _build(index, options, gpu=False)


def build_gpu_loader(index: ImageFolderIndex, options: LoaderOptions) -> DaliLoader:
    """The `dali-gpu` entry of DATA_BACKENDS: nvJPEG decoding on ctx's GPU."""
    return _build(index, options, gpu=True)


def _build(index: ImageFolderIndex, options: LoaderOptions, gpu: bool) -> DaliLoader:
    return DaliLoader(index, train=options.train, gpu=gpu, image_size=options.image_size,
                      batch_size=options.batch_size, ctx=options.ctx, workers=options.workers,
                      prefetch=options.prefetch, interpolation=options.interpolation, augmentation=options.augmentation,
                      magnitude=options.magnitude, seed=options.seed, crop_pct=options.crop_pct,
                      repeats=options.repeats, mean=options.mean, std=options.std)
