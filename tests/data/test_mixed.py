import gc
import threading

import numpy as np
import pytest
import torch

from data.mixed import MixedBatchLoader, MixedBatchSampler
from data.pseudolabel_file import PseudoLabelReader
from data.pseudolabel_writer import PseudoLabelWriter


def sampler(**kw):
    args = dict(num_labeled=70, num_pool=30, batch_size=10, unsup_fraction=0.3, epoch_size=100, seed=0)
    args.update(kw)
    return MixedBatchSampler(args.pop("num_labeled"), args.pop("num_pool"), **args)


def batches(s):
    return [(lab.copy(), pool.copy()) for lab, pool in s]


def test_exact_fraction_and_dtypes():
    s = sampler()
    out = batches(s)
    assert len(out) == len(s) == 10
    for lab, pool in out:
        assert len(lab) == 7 and len(pool) == 3
        assert lab.dtype == np.int64 and pool.dtype == np.int64


def test_labeled_covers_each_index_once_per_pass():
    lab = np.concatenate([lab for lab, _ in sampler()])  # 10 batches x 7 = 70 = num_labeled
    assert np.array_equal(np.sort(lab), np.arange(70))
    # two passes: each half is a permutation
    lab = np.concatenate([lab for lab, _ in sampler(epoch_size=200)])
    assert np.array_equal(np.sort(lab[:70]), np.arange(70)) and np.array_equal(np.sort(lab[70:]), np.arange(70))


def test_pool_with_replacement_in_range():
    pool = np.concatenate([p for _, p in sampler(num_pool=5, unsup_fraction=0.5)])
    assert pool.min() >= 0 and pool.max() < 5
    assert len(np.unique(pool)) < len(pool)


def test_all_pool_and_all_labeled_and_errors():
    assert all(len(lab) == 0 and len(p) == 10 for lab, p in sampler(unsup_fraction=1.0, num_labeled=0))
    assert all(len(lab) == 10 and len(p) == 0 for lab, p in sampler(unsup_fraction=0.0, num_pool=0))
    with pytest.raises(ValueError):
        sampler(num_pool=0, unsup_fraction=0.3)
    with pytest.raises(ValueError):
        sampler(world_size=3, rank=0)  # 10 not divisible by 3


def test_len_and_last_batch():
    assert len(sampler(epoch_size=105)) == 10
    s = sampler(epoch_size=105, drop_last=False)
    out = batches(s)
    assert len(s) == len(out) == 11 and len(out[-1][0]) + len(out[-1][1]) == 5


def test_set_epoch_changes_and_reproduces():
    s = sampler()
    s.set_epoch(0)
    e0 = batches(s)
    s.set_epoch(1)
    e1 = batches(s)
    s.set_epoch(0)
    again = batches(s)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(e0, e1))
    for a, b in zip(e0, again):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_resume_from_state_dict():
    s = sampler()
    s.set_epoch(3)
    full = batches(s)
    s.set_epoch(3)
    it = iter(s)
    for _ in range(4):
        next(it)
    state = s.state_dict()
    assert state == {"epoch": 3, "batch": 4}

    t = sampler()
    t.load_state_dict(state)
    t.set_epoch(3)  # the usual loop calls set_epoch again: must keep the resume point
    rest = batches(t)
    assert len(rest) == 6
    for a, b in zip(full[4:], rest):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert batches(t)[0][0].tolist() == full[0][0].tolist()  # the next pass replays the epoch whole


def test_two_ranks_split_the_global_batch():
    whole = batches(sampler(batch_size=10))
    r0 = batches(sampler(batch_size=10, rank=0, world_size=2))
    r1 = batches(sampler(batch_size=10, rank=1, world_size=2))
    for (lab, pool), (l0, p0), (l1, p1) in zip(whole, r0, r1):
        assert not set(l0) & set(l1)
        assert sorted(np.r_[l0, l1]) == sorted(lab) and np.array_equal(np.r_[p0, p1], pool)
        assert abs(len(l0) - len(l1)) <= 1


def encoded_images(n, source, shape=(6, 6, 3)):
    """uint8 NHWC images whose first pixel encodes (index, source) so loader output can be traced back."""
    x = np.random.default_rng(source).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = source
    return x


def check_loader_output(loader, lab_x, lab_y, pool_x, pool_y):
    seen = 0
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 6, 6) and x.is_contiguous()
        assert y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
        raw = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        from_pool = raw[:, 0, 0, 1] == 1  # the source each row encodes (encoded_images)
        for row, target, pooled in zip(raw, y.tolist(), from_pool):
            i = int(row[0, 0, 0])
            src_x, src_y = (pool_x, pool_y) if pooled else (lab_x, lab_y)
            np.testing.assert_array_equal(row, src_x[i])
            assert target == src_y[i]
        assert int(from_pool.sum()) == 3 and len(y) == 10
        seen += 1
    assert seen == len(loader)


def test_loader_yields_source_rows_in_memory_pool():
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    lab_y, pool_y = np.arange(70) % 10, (np.arange(30) * 3) % 10
    loader = MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1)
    check_loader_output(loader, lab_x, lab_y, pool_x, pool_y)
    # reproducible: same seed, same epoch -> identical batches (within-batch shuffle included)
    a = [t[0] for t in MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1)]
    b = [t[0] for t in MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_loader_with_h5_reader_pool(tmp_path):
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    lab_y, pool_y = np.arange(70) % 10, (np.arange(30) * 3) % 10
    path = tmp_path / "pseudolabels.h5"
    w = PseudoLabelWriter(path, capacity=30, image_shape=(6, 6, 3), num_classes=10, rows_per_chunk=8,
                          attrs={"class_names": list("abcdefghij"), "pool_name": "t", "pool_fingerprint": "p",
                                 "teacher_fingerprint": "t"})
    w.append(images=pool_x, labels=pool_y, confidence=np.ones(30), pool_index=np.arange(30), pool_rows_done=30)
    w.finish()
    reader = PseudoLabelReader(path)
    loader = MixedBatchLoader(sampler(), lab_x, lab_y, reader, reader.labels)
    check_loader_output(loader, lab_x, lab_y, pool_x, pool_y)


def test_loader_augment_and_state():
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    calls = []

    def augment(x, generator):
        calls.append(generator.initial_seed())
        return x.flip(3)

    loader = MixedBatchLoader(sampler(), lab_x, np.zeros(70), pool_x, np.zeros(30), augment=augment, prefetch=3)
    it = iter(loader)
    for _ in range(2):
        next(it)
    assert loader.state_dict() == {"epoch": 0, "batch": 2}  # consumed, not how far the worker ran ahead
    it.close()
    assert len(set(calls)) == len(calls) >= 2  # a fresh seed per batch


def test_worker_exception_propagates():
    class Broken:
        def gather(self, idx):
            raise RuntimeError("disk on fire")

    loader = MixedBatchLoader(sampler(), encoded_images(70, 0), np.zeros(70), Broken(), np.zeros(30))
    with pytest.raises(RuntimeError, match="disk on fire"):
        for _ in loader:
            pass


def test_early_break_does_not_hang():
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    s = sampler(epoch_size=10_000)
    loader = MixedBatchLoader(s, lab_x, np.zeros(70), pool_x, np.zeros(30), prefetch=1)
    for _ in loader:
        thread = loader._thread
        break
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()

    # abandoning a live iterator without closing it: the loader's __del__ stops the worker
    loader = MixedBatchLoader(s, lab_x, np.zeros(70), pool_x, np.zeros(30), prefetch=1)
    it = iter(loader)
    next(it)
    thread = loader._thread
    del it, loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert not any(t.name == "MixedBatchLoader-worker" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_depth_does_not_change_the_batches(prefetch):
    """prefetch=0 gathers in the consumer's thread (no worker): same batches, augmentation included."""
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    lab_y, pool_y = np.arange(70) % 10, (np.arange(30) * 3) % 10

    def flip(x, generator):
        return torch.where(torch.rand(len(x), generator=generator)[:, None, None, None] < 0.5, x.flip(3), x)

    def batches(depth):
        loader = MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1, augment=flip, prefetch=depth)
        return [(x, y) for x, y in loader], loader

    expected, _ = batches(2)
    got, loader = batches(prefetch)
    assert len(got) == len(expected) and loader.state_dict()["batch"] == len(expected)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    if prefetch == 0:
        assert loader._thread is None


def test_channels_last_changes_the_layout_not_the_values():
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    plain = [x for x, _ in MixedBatchLoader(sampler(), lab_x, np.zeros(70), pool_x, np.zeros(30), seed=1)]
    nhwc = [x for x, _ in MixedBatchLoader(sampler(), lab_x, np.zeros(70), pool_x, np.zeros(30), seed=1,
                                            channels_last=True)]
    assert all(b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous() for b in nhwc)
    assert all(torch.equal(a, b) for a, b in zip(plain, nhwc))


def test_a_cpu_loader_neither_pins_nor_uses_a_copy_stream(monkeypatch):
    """On a CPU the gathered arrays are used as they are: no pinned copy (it would need CUDA), no stream."""
    def no_pinning(self, *args, **kwargs):
        raise AssertionError("a CPU loader pinned a batch")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    lab_y, pool_y = np.arange(70) % 10, (np.arange(30) * 3) % 10
    for prefetch in (0, 2):
        loader = MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1, prefetch=prefetch)
        assert loader._copy_stream is None
        check_loader_output(loader, lab_x, lab_y, pool_x, pool_y)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_copy_stream_path_hands_out_a_batch_before_queuing_the_next_copy(prefetch):
    """The CUDA path's order, with the CUDA calls replaced by recorders: batch k+1's copy is queued before
    batch k reaches the step (so it overlaps the step), batch k's wait on the copy stream comes before
    batch k+1's copy is queued (so that wait does not cover it), and state_dict counts batches handed
    out, not copies queued. The batches are the CPU path's."""
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    lab_y, pool_y = np.arange(70) % 10, (np.arange(30) * 3) % 10
    expected = list(MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1, prefetch=prefetch))

    events = []
    loader = MixedBatchLoader(sampler(), lab_x, lab_y, pool_x, pool_y, seed=1, prefetch=prefetch)
    loader._copy_stream = "stream"

    def start_copy(x, y, from_pool):
        events.append(("copy", int(x[0, 0, 0, 0])))  # the first row's encoded index tells the batches apart
        return torch.as_tensor(x), torch.as_tensor(y), from_pool

    def finish_copy(x, y, from_pool):
        events.append(("wait", int(x[0, 0, 0, 0])))
        return x, y, from_pool

    loader._start_copy, loader._finish_copy = start_copy, finish_copy
    got = []
    for k, (x, y) in enumerate(loader):
        assert loader.state_dict()["batch"] == k + 1
        events.append(("step", k))
        got.append((x, y))
    assert len(got) == len(expected) == 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    kinds = [kind for kind, _ in events]
    assert kinds == ["copy"] + ["wait", "copy", "step"] * 9 + ["wait", "step"]
    copies = [i for kind, i in events if kind == "copy"]
    waits = [i for kind, i in events if kind == "wait"]
    assert copies == waits  # every batch waited for its own copy, in order


def test_copy_stream_path_stops_the_worker_when_the_consumer_breaks_out():
    lab_x, pool_x = encoded_images(70, 0), encoded_images(30, 1)
    loader = MixedBatchLoader(sampler(epoch_size=10_000), lab_x, np.zeros(70), pool_x, np.zeros(30), prefetch=1)
    loader._copy_stream = "stream"
    loader._start_copy = lambda x, y, from_pool: (torch.as_tensor(x), torch.as_tensor(y), from_pool)
    loader._finish_copy = lambda x, y, from_pool: (x, y, from_pool)
    it = iter(loader)
    next(it)
    thread = loader._thread
    it.close()  # what a `break` out of the for loop does
    thread.join(timeout=5)
    assert not thread.is_alive()
