"""File pools at scale: one file or parts, read in place (npz stored or deflated, npy, HDF5), opened cheaply,
bad parts refused with the file named; rst-pickle converted once."""
import os
import pickle
import zipfile

import h5py
import numpy as np
import pytest

from data import pool_files, pools, rst_pickle
from data.pools import open_pool
from pipeline.core.errors import UserError

IMAGES = np.random.default_rng(0).integers(0, 256, size=(23, 32, 32, 3), dtype=np.uint8)
LABELS = (np.arange(23) * 7 % 10).astype(np.int64)
OLD_NS = 1_600_000_000 * 10**9  # outside the digest cache's racy window, so digests are remembered
SPLITS = {1: [23], 2: [10, 13], 3: [7, 1, 15]}


def _age(path):
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


def _save_npy(path, array):
    np.save(path, array)
    return _age(path)


def _save_npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return _age(path)


def _save_h5(path, images, labels):
    with h5py.File(path, "w") as h5:
        h5["images"], h5["labels"] = images, labels
    return _age(path)


# layout -> (provider, writer(path_stem, images, labels) -> file, extra options)
LAYOUTS = {
    "npz-stored": ("npz", lambda p, x, y: _save_npz(p.with_suffix(".npz"), image=x, label=y)),
    "npz-deflated": ("npz", lambda p, x, y: _save_npz(p.with_suffix(".npz"), True, image=x, label=y)),
    "npy": ("npy", lambda p, x, y: _save_npy(p.with_suffix(".npy"), x)),
    "hdf5": ("hdf5", lambda p, x, y: _save_h5(p.with_suffix(".h5"), x, y)),
}


def _write_parts(tmp_path, layout, sizes, images=IMAGES, labels=LABELS):
    provider, write = LAYOUTS[layout]
    bounds = np.cumsum([0, *sizes])
    files = [write(tmp_path / f"part-{i:02d}", images[a:b], labels[a:b])
             for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return provider, [str(f) for f in files]


def _open(labeled, provider, path, **options):
    return open_pool(provider, {"path": path, **options}, labeled=labeled, remainder_index=np.arange(3))


@pytest.mark.parametrize("parts", SPLITS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parts_read_as_one_array(tmp_path, labeled, layout, parts):
    provider, files = _write_parts(tmp_path, layout, SPLITS[parts])
    options = {}
    if layout == "npy":  # labels in one file for the whole pool
        options["labels_path"] = str(_save_npy(tmp_path / "labels.npy", LABELS))
    pool = _open(labeled, provider, files if parts > 1 else files[0], **options)
    assert len(pool) == 23
    for block in (4, 6, 23):  # in order, across part boundaries
        rows = np.concatenate([pool.read(s, s + block) for s in range(0, 23, block)])
        np.testing.assert_array_equal(rows, IMAGES)
    for start, stop in [(20, 30), (3, 12), (0, 2), (9, 9), (22, 23), (6, 18)]:  # out of order, clipped
        np.testing.assert_array_equal(pool.read(start, stop), IMAGES[start:stop])
        assert pool.read(start, stop).flags.c_contiguous
    np.testing.assert_array_equal(pool.provided_labels(), LABELS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_glob_is_sorted_and_fingerprint_covers_every_part(tmp_path, labeled, layout):
    provider, files = _write_parts(tmp_path, layout, SPLITS[3])
    suffix = os.path.splitext(files[0])[1]
    by_glob = _open(labeled, provider, str(tmp_path / f"part-*{suffix}"))
    np.testing.assert_array_equal(by_glob.read(0, 23), IMAGES)
    before = by_glob.fingerprint()
    del by_glob  # HDF5 refuses to rewrite a file this process holds open
    construct = pools.BUILTIN_PROVIDERS[provider]
    assert construct(files).fingerprint() == before
    assert construct(files[:2]).fingerprint() != before
    # The last part edited in place: same size, new content and mtime.
    _write_parts(tmp_path, layout, SPLITS[3], images=np.concatenate([IMAGES[:8], IMAGES[8:][::-1]]))
    os.utime(files[-1], ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    assert construct(files).fingerprint() != before


def test_parts_without_labels_everywhere_provide_none(tmp_path, labeled):
    first = _save_npz(tmp_path / "a.npz", image=IMAGES[:10], label=LABELS[:10])
    second = _save_npz(tmp_path / "b.npz", image=IMAGES[10:])
    assert _open(labeled, "npz", [str(first), str(second)]).provided_labels() is None


def test_npy_labels_in_parts(tmp_path, labeled):
    _, files = _write_parts(tmp_path, "npy", SPLITS[2])
    labels = [str(_save_npy(tmp_path / f"labels-{i}.npy", part)) for i, part in enumerate(np.split(LABELS, [10]))]
    pool = _open(labeled, "npy", files, labels_path=str(tmp_path / "labels-*.npy"))
    np.testing.assert_array_equal(pool.provided_labels(), LABELS)
    np.save(labels[1], LABELS[10:12])
    with pytest.raises(UserError, match="expected 23 integers"):
        _open(labeled, "npy", files, labels_path=labels).provided_labels()


def test_fortran_order_npy(tmp_path, labeled):
    path = _save_npy(tmp_path / "f.npy", np.asfortranarray(IMAGES))
    np.testing.assert_array_equal(_open(labeled, "npy", str(path)).read(4, 17), IMAGES[4:17])


# --- opened cheaply ------------------------------------------------------------------------------

def _forbid(monkeypatch, *targets):
    def refuse(*args, **kwargs):
        raise AssertionError("the pool was read")
    for module, name in targets:
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("layout", [*LAYOUTS, "rst-pickle"])
def test_construct_and_fingerprint_read_no_rows(tmp_path, labeled, monkeypatch, layout):
    if layout == "rst-pickle":
        path = tmp_path / "pool.pickle"
        path.write_bytes(pickle.dumps({"data": IMAGES, "extrapolated_targets": LABELS}))
        _age(path)
        provider, path = "rst-pickle", str(path)
    else:
        provider, files = _write_parts(tmp_path, layout, SPLITS[2])
        path = files
    expected = pools.BUILTIN_PROVIDERS[provider](path).fingerprint()  # hashes the files once
    _forbid(monkeypatch, (pools, "open_npy_part"), (pools, "open_npz_part"), (pools, "Hdf5Part"),
            (pools, "convert_rst_pickle"), (rst_pickle, "safe_load"), (np, "load"), (zipfile, "ZipFile"),
            (h5py, "File"))
    monkeypatch.setattr("pipeline.core.fingerprint._memo", {})  # the next command: only the digest cache answers
    monkeypatch.setattr("pipeline.core.fingerprint.hash_file", lambda *a: pytest.fail("hashed again"))
    assert pools.BUILTIN_PROVIDERS[provider](path).fingerprint() == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_len_reads_headers_only(tmp_path, monkeypatch, layout):
    provider, files = _write_parts(tmp_path, layout, SPLITS[2])
    decompressed = []
    real_read = zipfile.ZipExtFile.read
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1: decompressed.append(n) or real_read(self, n))
    _forbid(monkeypatch, (pool_files.RawArrayPart, "read"), (pool_files.DeflatedMemberPart, "read"),
            (pool_files.Hdf5Part, "read"))
    assert len(pools.BUILTIN_PROVIDERS[provider](files)) == 23
    assert all(0 <= n < 1024 for n in decompressed)  # the .npy header of a 30 KB member, not the member


def test_deflated_member_streams_in_order_and_restarts_backwards(tmp_path, monkeypatch, labeled):
    _, files = _write_parts(tmp_path, "npz-deflated", SPLITS[1])
    pool = _open(labeled, "npz", files[0])
    seeks = []
    real_seek = zipfile.ZipExtFile.seek
    monkeypatch.setattr(zipfile.ZipExtFile, "seek", lambda self, *a: seeks.append(a) or real_seek(self, *a))
    for start in range(8, 23, 5):  # continues where open_pool's validation read stopped
        np.testing.assert_array_equal(pool.read(start, start + 5), IMAGES[start:start + 5])
    assert seeks == []
    np.testing.assert_array_equal(pool.read(2, 4), IMAGES[2:4])
    assert len(seeks) == 1


# --- bad input -----------------------------------------------------------------------------------

def test_glob_matching_nothing(tmp_path, labeled):
    pattern = str(tmp_path / "part-*.npz")
    with pytest.raises(UserError, match="matches no file") as err:
        _open(labeled, "npz", pattern)
    assert pattern in str(err.value)
    with pytest.raises(UserError, match="names no file"):
        _open(labeled, "npz", [])


def test_same_file_twice(tmp_path, labeled):
    _, files = _write_parts(tmp_path, "npy", SPLITS[2])
    with pytest.raises(UserError, match="twice") as err:
        _open(labeled, "npy", [files[0], str(tmp_path / "part-*.npy")])
    assert files[0] in str(err.value)


@pytest.mark.parametrize("odd", ["shape", "dtype"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parts_that_differ(tmp_path, labeled, layout, odd):
    provider, files = _write_parts(tmp_path, layout, SPLITS[2])
    changed = IMAGES[:5, :30] if odd == "shape" else IMAGES[:5].astype(np.float32)
    (tmp_path / "odd").mkdir()
    _, [other] = _write_parts(tmp_path / "odd", layout, [5], images=changed)
    with pytest.raises(UserError, match="all parts of a pool must share") as err:
        _open(labeled, provider, [*files, other])
    assert other in str(err.value) and files[0] in str(err.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_part(tmp_path, labeled, layout):
    provider, files = _write_parts(tmp_path, layout, SPLITS[2])
    data = open(files[1], "rb").read()
    open(files[1], "wb").write(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="truncated|damaged") as err:
        _open(labeled, provider, files).read(0, 23)
    assert files[1] in str(err.value)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_npz_member_neither_stored_nor_deflated(tmp_path, labeled, method):
    path = tmp_path / "pool.npz"
    with zipfile.ZipFile(path, "w", compression=method) as archive, archive.open("image.npy", "w") as member:
        np.lib.format.write_array(member, IMAGES)
    with pytest.raises(UserError, match="stored.*deflated") as err:
        _open(labeled, "npz", str(path))
    assert str(path) in str(err.value) and "np.savez" in str(err.value)


# --- rst-pickle --------------------------------------------------------------------------------------

def _write_pickle(path, images, labels, mtime_ns=OLD_NS):
    path.write_bytes(pickle.dumps({"data": images, "extrapolated_targets": list(labels)}, protocol=4))
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return str(path)


def test_rst_pickle_converts_once_and_again_after_a_change(tmp_path, labeled, monkeypatch):
    path, cache = _write_pickle(tmp_path / "ti.pickle", IMAGES, LABELS), tmp_path / "pool-cache"

    def opened():
        return open_pool("rst-pickle", {"path": path}, labeled=labeled, remainder_index=np.arange(3), cache_dir=cache)

    loads = []
    real_load = rst_pickle.safe_load
    monkeypatch.setattr(rst_pickle, "safe_load", lambda p: loads.append(p) or real_load(p))
    first = opened()
    np.testing.assert_array_equal(first.read(0, 23), IMAGES)
    first_fingerprint = first.fingerprint()
    converted = sorted(p.name for p in cache.glob("*.npy"))
    assert len(loads) == 1 and len(converted) == 2  # images and labels, named by the pickle's digest
    second = opened()
    np.testing.assert_array_equal(second.read(5, 9), IMAGES[5:9])
    np.testing.assert_array_equal(second.provided_labels(), LABELS)
    assert len(loads) == 1 and second.fingerprint() == first_fingerprint
    _write_pickle(tmp_path / "ti.pickle", IMAGES[::-1], LABELS[::-1], OLD_NS + 10**9)  # same size, new content
    third = opened()
    np.testing.assert_array_equal(third.read(0, 23), IMAGES[::-1])
    assert len(loads) == 2 and third.fingerprint() != first_fingerprint
    assert len(list(cache.glob("*.npy"))) == 4
    assert not list(cache.glob("*.tmp"))  # written through temporary names, renamed into place


def test_rst_pickle_cache_dir_not_writable(tmp_path, labeled):
    path = _write_pickle(tmp_path / "ti.pickle", IMAGES, LABELS)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write the converted pool") as err:
        open_pool("rst-pickle", {"path": path}, labeled=labeled, remainder_index=np.arange(3), cache_dir=blocker / "c")
    assert path in str(err.value)


def test_cache_dir_goes_only_to_providers_that_take_it(tmp_path, labeled):
    _, files = _write_parts(tmp_path, "npy", SPLITS[1])
    pool = open_pool("npy", {"path": files[0]}, labeled=labeled, remainder_index=np.arange(3), cache_dir=tmp_path)
    assert len(pool) == 23


def test_npy_labels_path_missing(tmp_path, labeled):
    _, files = _write_parts(tmp_path, "npy", SPLITS[1])
    missing = str(tmp_path / "labels.npy")
    with pytest.raises(UserError, match="pool.labels_path") as err:
        _open(labeled, "npy", files[0], labels_path=missing)
    assert missing in str(err.value)
