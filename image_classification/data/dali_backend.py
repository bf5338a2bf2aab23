"""The `dali-cpu` and `dali-gpu` backends: NVIDIA DALI pipelines fed with our own per-epoch file order.

Instead of letting fn.readers.file shuffle, the loader computes each epoch's shard order itself (the same
order as the pytorch backend, see the index's epoch_order) and feeds the encoded files (or tar shard
members, see shard_reader.py) batch by batch through fn.external_source. That makes the data order an exact
function of (seed, epoch, rank) and lets `skip_batches` start mid-epoch on exactly the right files. DALI's own random draws (crop window, flip,
augmentation policy) come from the pipeline seed, derived from (seed, epoch, rank, first batch), so an
epoch started from its beginning is reproduced exactly; that is why each training epoch builds its own
pipeline, while validation, which draws nothing at random, keeps one pipeline for all its passes. A
training epoch resumed mid-way is exact too: training pipelines run with DALI checkpointing on,
`state_dict()` saves the checkpoint taken after the last batch handed out (its random generators' states,
a few KiB) and the resumed loader rebuilds the pipeline from it, so the batches after a resume equal the
uninterrupted run's bit for bit.

The graphs themselves (the reference's crop, resize and normalisation, the --augmentation policies, the
--interpolation filters) and the checks of what may reach DALI's decoder are in dali_graph.py.

Batches: dali-gpu normalises on the GPU inside DALI. dali-cpu decodes, crops, flips, resizes and augments
on the CPU; on a GPU run it hands out uint8 batches, copied from pinned memory on a side stream and
normalised on the GPU (as the reference did, and as the pytorch backend does), and on a CPU run it
normalises in DALI's threads (see normalizes_in_pipeline).

Unreadable files: a file that dali_graph.unusable refuses (empty, not an image format DALI decodes, a
decompression bomb) never reaches DALI. A file that passes those checks but fails to decode (truncated or
corrupt data) makes the pipeline's decoder raise; the loader then probes the batch's files one by one with a
one-image DALI decoder, records the failing ones, and rebuilds the pipeline from that batch on. A failure of
any other step is raised at once. Training replaces an unreadable file by the next readable file in dataset
order (with its label) and validation drops it, as the pytorch backend does, so both backends give the same
batches' files and labels.
"""
from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cli import UserError
from ..context import ExecutionContext
from .augmentations import POLICIES
from .dali_graph import dali_modules, interp_type, is_decode_failure, probe_graph, train_graph, unusable, val_graph
from .folder import (DROPPED, REPLACED, DataError, ImageFolderIndex, UnreadableSample, epoch_samples, epoch_seed,
                     shard_size)
from .loader import MEAN, STD, Batch, Loader, Triple, device_batches, val_resize_size

if TYPE_CHECKING:
    from . import LoaderOptions

log = logging.getLogger(__name__)


def shutdown(pipe) -> None:
    """Stop a pipeline's executor threads now, in the process that started them.

    DALI stops them in `Pipeline.__del__`. Left to the garbage collector, that may run in a forked child (a
    DataLoader worker) that inherited the pipeline but not its threads, where the executor's destructor waits
    for them forever. `_shutdown` is that destructor's body; afterwards the object holds no threads.
    """
    pipe._shutdown()


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
        graph = train_graph if self.train else val_graph
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
        pipe = pipeline_def(probe_graph)(lambda: [data], decoder=self.graph_options["decoder"], batch_size=1,
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
