"""RST's mixed batches: a sampler of (labeled, pool) indices and a prefetching loader that builds tensors."""
from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor


class MixedBatchSampler:
    """Yields batches mixing labeled and pseudo-labeled examples. RST (Carmon et al. 2019): a fraction
    `unsup_fraction` of each batch comes from the pool, sampled with replacement; the labeled part walks a
    fresh permutation of the labeled set without replacement (starting a new permutation when exhausted);
    an epoch is `epoch_size` examples whatever the pool size.

    `batch_size` is the global batch. Every rank generates the same global batch from
    (seed, epoch) and keeps its slice of the labeled part and of the pool part, so ranks see
    disjoint labeled rows and the same labeled fraction up to rounding.
    """

    def __init__(self, num_labeled: int, num_pool: int, *, batch_size: int, unsup_fraction: float,
                 epoch_size: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if batch_size <= 0 or epoch_size <= 0:
            raise ValueError(f"batch_size and epoch_size must be positive, got {batch_size}, {epoch_size}")
        if not 0.0 <= unsup_fraction <= 1.0:
            raise ValueError(f"unsup_fraction must be in [0, 1], got {unsup_fraction}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}")
        if unsup_fraction > 0 and num_pool == 0:
            raise ValueError("unsup_fraction > 0 but the pseudo-labeled pool is empty")
        if drop_last and epoch_size < batch_size:
            raise ValueError(f"epoch_size {epoch_size} < batch_size {batch_size}: an epoch would have no batch")
        self.num_labeled, self.num_pool = int(num_labeled), int(num_pool)
        self.batch_size, self.unsup_fraction = int(batch_size), float(unsup_fraction)
        self.epoch_size, self.seed = int(epoch_size), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.batch_sizes = self._batch_sizes()
        if self.num_labeled == 0 and any(lab for lab, _ in self.batch_sizes):
            raise ValueError("the labeled set is empty but unsup_fraction < 1 asks for labeled rows")
        self.epoch = 0
        self._position = 0     # batches of `epoch` handed out so far (what state_dict reports)
        self._resume_at = 0    # batches the next iteration skips (set by load_state_dict)

    def _split(self, size: int) -> tuple[int, int]:
        n_pool = round(size * self.unsup_fraction)
        return size - n_pool, n_pool

    def _batch_sizes(self) -> list[tuple[int, int]]:
        """(n_labeled, n_pool) of each global batch of an epoch."""
        full, rest = divmod(self.epoch_size, self.batch_size)
        sizes = [self._split(self.batch_size)] * full
        if rest and not self.drop_last:
            sizes.append(self._split(rest))
        return sizes

    def set_epoch(self, epoch: int) -> None:
        """The epoch's randomness is f(seed, epoch), as with DistributedSampler. A position loaded by
        load_state_dict survives set_epoch of that same epoch, so the usual loop order works."""
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = int(epoch)
        self._position = self._resume_at

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._position}

    def load_state_dict(self, d: dict) -> None:
        self.epoch = int(d["epoch"])
        self._resume_at = self._position = int(d["batch"])

    def _epoch_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """All labeled and pool indices of the epoch's global batches, concatenated in batch order.

        Drawn whole up front so that resuming mid-epoch reproduces the remaining batches exactly.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        total_lab = sum(lab for lab, _ in self.batch_sizes)
        total_pool = sum(pool for _, pool in self.batch_sizes)
        passes = math.ceil(total_lab / self.num_labeled) if total_lab else 0
        labeled = np.concatenate([rng.permutation(self.num_labeled) for _ in range(passes)]
                                 or [np.empty(0, np.int64)])[:total_lab].astype(np.int64)
        pool = rng.integers(0, max(self.num_pool, 1), size=total_pool, dtype=np.int64)
        return labeled, pool

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(batch number within the epoch, labeled_idx, pool_idx) of this rank, from the resume point.

        The resume point is taken now, not at the first next(), so a caller handing the iterator to
        another thread can read state_dict() right after this call.
        """
        start = self._resume_at
        self._resume_at = 0  # one-shot: iterating the same epoch again replays it from the start
        self._position = start
        return self._batches_from(start, *self._epoch_indices())

    def _batches_from(self, start: int, labeled: np.ndarray, pool: np.ndarray):
        lab_ends = np.cumsum([0] + [lab for lab, _ in self.batch_sizes])
        pool_ends = np.cumsum([0] + [p for _, p in self.batch_sizes])
        for b in range(start, len(self.batch_sizes)):
            lab = labeled[lab_ends[b]:lab_ends[b + 1]]
            poo = pool[pool_ends[b]:pool_ends[b + 1]]
            if self.world_size > 1:
                lab = np.array_split(lab, self.world_size)[self.rank]
                poo = np.array_split(poo, self.world_size)[self.rank]
            self._position = b + 1
            yield b, lab, poo

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _, lab, pool in self.iter_batches():
            yield lab, pool


def _seed_for(*words: int) -> int:
    """A 64-bit seed for torch.Generator from several ints (torch seeds take one int)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


class _BatchBuilder:
    """Gathers one batch's rows in numpy (no torch op, so a worker thread running it never starts a second
    OpenMP team next to the training step's) and, for a CUDA device, copies them to pinned host memory;
    holds nothing that references the loader (so an abandoned loader can be garbage collected and its
    __del__ stop the thread)."""

    def __init__(self, labeled_images, labeled_targets, pool_images, pool_targets, seed, rank,
                 pin_device: torch.device | None = None):
        self.labeled_images, self.labeled_targets = labeled_images, labeled_targets
        self.pool_images, self.pool_targets = pool_images, pool_targets
        self.seed, self.rank, self.pin_device = seed, rank, pin_device

    def __call__(self, epoch: int, batch: int, lab: np.ndarray, pool: np.ndarray):
        x, y, from_pool = self._rows(epoch, batch, lab, pool)
        if self.pin_device is None:
            return x, y, from_pool
        # For a CUDA device only, where no OpenMP team computes the step on the host: page-locked copies
        # let the consumer's host-to-device copy run asynchronously (from pageable memory
        # .to(non_blocking=True) stages through a bounce buffer and waits). The worker thread selects the
        # rank's GPU first, as DataLoader's pin-memory thread does: otherwise pinning would open a CUDA
        # context on cuda:0 in every rank.
        with torch.cuda.device(self.pin_device):
            return torch.from_numpy(x).pin_memory(), torch.from_numpy(y).pin_memory(), from_pool

    def _rows(self, epoch: int, batch: int, lab: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, ...]:
        images = [self.labeled_images[lab]]
        targets = [self.labeled_targets[lab]]
        if len(pool):
            pool_images = self.pool_images
            images.append(pool_images[pool] if isinstance(pool_images, np.ndarray) else pool_images.gather(pool))
            targets.append(self.pool_targets[pool])

        # Shuffle within the batch so labeled and pool rows are not in blocks (BatchNorm statistics,
        # anything order-dependent); seeded by (seed, epoch, batch, rank) so a resumed run matches.
        order = np.random.default_rng([self.seed, epoch, batch, self.rank, 0]).permutation(len(lab) + len(pool))
        x = np.concatenate(images)[order]
        y = np.concatenate(targets).astype(np.int64, copy=False)[order]
        return x, y, order >= len(lab)  # the last: which rows came from the pool


def prefetch_depth(requested: int, device) -> int:
    """Batches to gather ahead in a thread: `requested` on a GPU, or on a CPU with a core left over from
    torch's compute threads; else 0. When every core runs the step's OpenMP team, the gathering thread
    preempts a team member and each of the step's barriers waits for it: on 2 cores, tiny-cnn MART steps
    ran at 0.60-0.64x the bare loop's speed with 1 or 2 batches prefetched, 1.43x with none
    (benchmarks/README.md, bench_mart)."""
    if torch.device(device).type != "cpu":
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return requested if cores > torch.get_num_threads() else 0


_DONE = object()


def _produce(batches, build, epoch, out: queue.Queue, stop: threading.Event) -> None:
    """Worker thread body: build items and put them into the bounded queue until done or stopped."""
    def put(item) -> bool:
        # Bounded wait so a consumer that went away (stop set) never leaves us blocked forever.
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for b, lab, pool in batches:
            if stop.is_set() or not put((b, build(epoch, b, lab, pool))):
                return
        put(_DONE)
    except BaseException as e:  # handed to the consumer, which re-raises it
        put(e)


class MixedBatchLoader:
    """Turns sampler batches into training tensors. A background thread gathers the next `prefetch`
    batches' rows (numpy only: it never competes with the compute threads for OpenMP) while the
    consumer converts each batch to float on `device` and augments it there; prefetch=0 gathers in the
    consumer's thread, with no thread at all.

    On a CUDA device the rows are gathered into pinned host memory and copied with non_blocking=True on
    a dedicated copy stream, one batch ahead: batch k+1 crosses the bus while the step of batch k
    computes, and the compute stream waits for that copy (wait_stream) before it touches the batch. On a
    CPU the arrays are used as they are (no pinning, no copy).

    Yields (x float32 NCHW in [0, 1] on `device`, in channels_last memory format with `channels_last`;
    y int64; with `with_source`, also a bool tensor, True on the rows drawn from the pool). `pool_images`
    is an in-memory uint8 NHWC array or a PseudoLabelReader (read with .gather). `augment(x, generator)`
    runs on `device` on the whole batch. The sampler runs ahead of the consumer by up to `prefetch`
    batches, so checkpoint the loader's state_dict (batches consumed), not the sampler's.
    """

    def __init__(self, sampler: MixedBatchSampler, labeled_images: np.ndarray, labeled_targets: np.ndarray,
                 pool_images, pool_targets: np.ndarray | None, *, device="cpu",
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = None, prefetch: int = 2,
                 seed: int = 0, channels_last: bool = False, with_source: bool = False):
        if labeled_images.ndim != 4 or labeled_images.dtype != np.uint8:
            raise ValueError(f"labeled_images must be uint8 NHWC, got {labeled_images.dtype} {labeled_images.shape}")
        if sampler.num_pool and (pool_images is None or pool_targets is None):
            raise ValueError("the sampler draws from a pool but no pool_images/pool_targets were given")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.sampler = sampler
        self.device = torch.device(device)
        self.prefetch = int(prefetch)
        self.augment, self.seed = augment, int(seed)
        self.with_source = with_source  # also yield a bool tensor marking the pool rows (recipe options use it)
        # The layout the model's convolutions take (run.channels_last), so no forward reorders its input.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        cuda = self.device.type == "cuda"
        self._build = _BatchBuilder(labeled_images, np.asarray(labeled_targets), pool_images,
                                    None if pool_targets is None else np.asarray(pool_targets), self.seed,
                                    sampler.rank, pin_device=self.device if cuda else None)
        # The host-to-device copies run here, so the compute stream never queues behind them.
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        # One generator re-seeded per batch with (seed, epoch, batch, rank): building one costs more than seeding it.
        self._generator = torch.Generator()
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._consumed = sampler.state_dict()

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict:
        """{"epoch", "batch"}: the position after the last batch this loader handed to its consumer."""
        return dict(self._consumed)

    def load_state_dict(self, d: dict) -> None:
        self.sampler.load_state_dict(d)
        self._consumed = self.sampler.state_dict()

    def _tensors(self, epoch: int, batch: int, x, y, from_pool: np.ndarray) -> tuple:
        # Move uint8 first (4x less traffic than float), then convert to NCHW float32 on the device.
        x, y = torch.as_tensor(x).to(self.device), torch.as_tensor(y).to(self.device)
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=self.memory_format).div_(255)
        if self.augment is not None:
            x = self.augment(x, self._generator.manual_seed(_seed_for(self.seed, epoch, batch, self.sampler.rank, 1)))
        if self.with_source:
            return x, y, torch.from_numpy(from_pool).to(self.device)
        return x, y

    def _start_copy(self, x: Tensor, y: Tensor, from_pool: np.ndarray) -> tuple:
        """Queue the pinned batch's copy to the GPU on the copy stream; returns at once."""
        with torch.cuda.stream(self._copy_stream):
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), from_pool

    def _finish_copy(self, x: Tensor, y: Tensor, from_pool: np.ndarray) -> tuple:
        """Make the batch the copy stream filled safe to use on the current (compute) stream."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self._copy_stream)  # kernels queued from here on start after the copy
        # The memory was allocated on the copy stream: without this the caching allocator could hand it
        # out again as soon as the tensor is freed, while compute kernels still read it.
        x.record_stream(compute)
        y.record_stream(compute)
        return x, y, from_pool

    def _deliver(self, rows, epoch: int):
        """(batch number, (x, y, from_pool) host rows) -> training tensors on the device, recording the position."""
        try:
            if self._copy_stream is None:
                for b, batch in rows:
                    tensors = self._tensors(epoch, b, *batch)
                    self._consumed = {"epoch": epoch, "batch": b + 1}
                    yield tensors
                return
            in_flight = None  # (batch number, its device tensors, whose copy is queued on the copy stream)
            for b, batch in rows:
                # Hand out the batch in flight before queuing the next copy, so that its wait_stream
                # covers its own copy only; the next copy then runs during its step.
                ready = None if in_flight is None else self._hand_out(epoch, *in_flight)
                in_flight = (b, self._start_copy(*batch))
                if ready is not None:
                    yield ready
            if in_flight is not None:
                yield self._hand_out(epoch, *in_flight)
        finally:
            rows.close()  # stops the worker thread at once when the consumer breaks out

    def _hand_out(self, epoch: int, b: int, copied: tuple) -> tuple:
        tensors = self._tensors(epoch, b, *self._finish_copy(*copied))
        self._consumed = {"epoch": epoch, "batch": b + 1}
        return tensors

    def __iter__(self):
        self.close()  # a previous, abandoned iteration must not keep its thread
        epoch = self.sampler.epoch
        batches = self.sampler.iter_batches()
        self._consumed = self.sampler.state_dict()  # the resume point, before the worker runs ahead
        if self.prefetch == 0:
            return self._deliver(self._gather_here(batches, epoch), epoch)
        items: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=_produce, name="MixedBatchLoader-worker", daemon=True,
                                  args=(batches, self._build, epoch, items, stop))
        self._thread, self._stop = thread, stop
        thread.start()
        return self._deliver(self._consume(items, stop, thread), epoch)

    def _gather_here(self, batches, epoch: int):
        for b, lab, pool in batches:
            yield b, self._build(epoch, b, lab, pool)

    def _consume(self, items: queue.Queue, stop: threading.Event, thread: threading.Thread):
        try:
            while True:
                try:
                    item = items.get(timeout=0.1)
                except queue.Empty:
                    if thread.is_alive() or not items.empty():
                        continue
                    return  # the worker was stopped by close() from elsewhere
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # (batch number, rows)
        finally:
            # Runs on exhaustion, on an exception, and when the consumer breaks out (generator close).
            stop.set()
            thread.join(timeout=5)

    def close(self) -> None:
        """Stop and join the worker thread of the current iteration, if any."""
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)  # __init__ may have failed
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread, self._stop = None, None

    def __del__(self) -> None:
        self.close()
