"""Pool providers round-trip their files; open_pool converts only when asked and explains every refusal."""
import importlib.metadata
import mmap
import os
import pickle

import h5py
import numpy as np
import pytest
from PIL import Image

from data.labeled import LabeledSet
from data.pools import open_pool
from pipeline.core.errors import UserError

IMAGES = np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
LABELS = np.arange(20, dtype=np.int64) % 10


def _open(labeled, provider, **options):
    limit, convert = options.pop("limit", 0), options.pop("convert", ())
    return open_pool(provider, options, labeled=labeled, remainder_index=np.arange(3), limit=limit, convert=convert)


# Each writer stores `images` (and labels) in one provider's format and returns that provider's options.
def _write_rst_pickle(tmp_path, images, labels):
    path = tmp_path / "ti_500K_pseudo_labeled.pickle"
    path.write_bytes(pickle.dumps({"data": images, "extrapolated_targets": list(labels)}, protocol=4))
    return {"path": str(path)}


def _write_npz(tmp_path, images, labels):
    path = tmp_path / "pool.npz"
    np.savez(path, image=images, label=labels)
    return {"path": str(path)}


def _write_npy(tmp_path, images, labels):
    np.save(tmp_path / "pool.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    return {"path": str(tmp_path / "pool.npy"), "labels_path": str(tmp_path / "labels.npy")}


def _write_hdf5(tmp_path, images, labels):
    path = tmp_path / "pseudolabels.h5"
    with h5py.File(path, "w") as h5:
        h5["images"], h5["labels"] = images, labels
    return {"path": str(path)}


def _write_folder(tmp_path, images, labels):
    for i, image in enumerate(images):
        file = tmp_path / "imgs" / f"part{i // 10}" / f"{i:03d}.png"  # sorted relpath order = row order
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(file)
        os.utime(file, ns=(10**18 + len(images), 10**18 + len(images)))  # mtime differs between rewrites
    return {"path": str(tmp_path / "imgs")}


WRITERS = {"rst-pickle": _write_rst_pickle, "npz": _write_npz, "npy": _write_npy, "hdf5": _write_hdf5,
           "folder": _write_folder}


@pytest.mark.parametrize("provider", WRITERS)
def test_provider_round_trip(tmp_path, labeled, provider):
    options = WRITERS[provider](tmp_path, IMAGES, LABELS)
    pool = _open(labeled, provider, **options)
    assert len(pool) == 20 and options["path"] in pool.name
    np.testing.assert_array_equal(pool.read(3, 9), IMAGES[3:9])
    whole = np.concatenate([pool.read(start, start + 7) for start in range(0, 20, 7)])
    np.testing.assert_array_equal(whole, IMAGES)
    assert pool.read(0, 4).flags.c_contiguous
    if provider != "folder":
        np.testing.assert_array_equal(pool.provided_labels(), LABELS)
    before = pool.fingerprint()
    del pool  # releases the lazily opened HDF5 handle so the file can be rewritten in place
    WRITERS[provider](tmp_path, IMAGES[::-1][:19].copy(), LABELS[:19])
    assert _open(labeled, provider, **options).fingerprint() != before


def test_hdf5_opens_lazily(tmp_path):
    from data.pools import Hdf5Pool

    pool = Hdf5Pool(_write_hdf5(tmp_path, IMAGES, LABELS)["path"])
    assert pool._parts is None  # no handle held at construction
    first = pool._opened()
    assert pool._opened() is first
    np.testing.assert_array_equal(pool.read(18, 30), IMAGES[18:])


def test_limit_and_convert_change_fingerprint(tmp_path, labeled):
    path = _write_npz(tmp_path, IMAGES, LABELS)["path"]
    plain, limited = _open(labeled, "npz", path=path), _open(labeled, "npz", path=path, limit=5)
    assert len(limited) == 5 and limited.read(0, 100).shape[0] == 5
    np.testing.assert_array_equal(limited.provided_labels(), LABELS[:5])
    resized = _open(labeled, "npz", path=path, convert=["resize"])  # already 32x32: a no-op, still explicit
    assert len({plain.fingerprint(), limited.fingerprint(), resized.fingerprint()}) == 3


def test_rst_pickle_channels_first_is_detected(tmp_path, labeled):
    options = _write_rst_pickle(tmp_path, IMAGES.transpose(0, 3, 1, 2).copy(), LABELS)
    with pytest.raises(UserError, match="channels-first") as err:
        _open(labeled, "rst-pickle", **options)
    assert options["path"] in str(err.value) and '"nchw-to-nhwc"' in str(err.value)
    pool = _open(labeled, "rst-pickle", **options, convert=["nchw-to-nhwc"])
    np.testing.assert_array_equal(pool.read(0, 20), IMAGES)


def test_rst_pickle_without_data(tmp_path, labeled):
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps({"images": IMAGES}))
    with pytest.raises(UserError, match="'data'") as err:
        _open(labeled, "rst-pickle", path=str(path))
    assert str(path) in str(err.value)


def test_npz_not_a_zip_and_missing_key(tmp_path, labeled):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(UserError, match="not a valid .npz") as err:
        _open(labeled, "npz", path=str(bad))
    assert str(bad) in str(err.value)
    keyed = tmp_path / "keyed.npz"
    np.savez(keyed, x=IMAGES, y=LABELS)
    with pytest.raises(UserError, match="x, y") as err:
        _open(labeled, "npz", path=str(keyed))
    assert str(keyed) in str(err.value)
    assert len(_open(labeled, "npz", path=str(keyed), image_key="x")) == 20


def test_empty_pool(tmp_path, labeled):
    path = tmp_path / "empty.npy"
    np.save(path, IMAGES[:0])
    with pytest.raises(UserError, match="empty") as err:
        _open(labeled, "npy", path=str(path))
    assert str(path) in str(err.value)


def test_float_images_need_explicit_conversion(tmp_path, labeled):
    path = tmp_path / "float.npy"
    floats = IMAGES.astype(np.float32) / 255
    np.save(path, floats)
    with pytest.raises(UserError) as err:
        _open(labeled, "npy", path=str(path))
    assert 'pool.convert = ["float-to-uint8"]' in str(err.value) and str(path) in str(err.value)
    pool = _open(labeled, "npy", path=str(path), convert=["float-to-uint8"])
    np.testing.assert_array_equal(pool.read(0, 20), IMAGES)
    np.save(path, floats * 2)
    with pytest.raises(UserError, match=r"\[0, 1\]") as err:
        _open(labeled, "npy", path=str(path), convert=["float-to-uint8"])
    assert str(path) in str(err.value)


def test_wrong_size_suggests_resize(tmp_path, labeled):
    path = tmp_path / "small.npy"
    np.save(path, IMAGES[:, :28, :28])
    with pytest.raises(UserError, match=r"\(28, 28, 3\).*\(32, 32, 3\)") as err:
        _open(labeled, "npy", path=str(path))
    assert '"resize"' in str(err.value) and str(path) in str(err.value)
    assert _open(labeled, "npy", path=str(path), convert=["resize"]).read(0, 2).shape == (2, 32, 32, 3)


def test_gray_to_rgb(tmp_path, labeled):
    path = tmp_path / "gray.npy"
    np.save(path, IMAGES[..., :1])
    with pytest.raises(UserError, match='"gray-to-rgb"') as err:
        _open(labeled, "npy", path=str(path))
    assert str(path) in str(err.value)
    rgb = _open(labeled, "npy", path=str(path), convert=["gray-to-rgb"]).read(0, 20)
    np.testing.assert_array_equal(rgb, np.repeat(IMAGES[..., :1], 3, axis=3))
    with pytest.raises(UserError, match="gray-to-rgb needs 1 channel"):  # never a silent no-op
        _open(labeled, "npy", path=_write_npy(tmp_path, IMAGES, LABELS)["path"], convert=["gray-to-rgb"])


def test_rgb_to_gray_matches_pillow(tmp_path, labeled):
    gray = LabeledSet("gray", labeled.train_images[..., :1].copy(), labeled.train_labels,
                      labeled.test_images[..., :1].copy(), labeled.test_labels, labeled.class_names)
    path = _write_npy(tmp_path, IMAGES, LABELS)["path"]
    with pytest.raises(UserError, match='"rgb-to-gray"'):
        _open(gray, "npy", path=path)
    converted = _open(gray, "npy", path=path, convert=["rgb-to-gray"]).read(0, 3)
    expected = np.stack([np.asarray(Image.fromarray(image).convert("L"))[..., None] for image in IMAGES[:3]])
    np.testing.assert_array_equal(converted, expected)


@pytest.mark.parametrize("provider", WRITERS)
def test_missing_path(tmp_path, labeled, provider):
    missing = str(tmp_path / "nowhere" / "pool.bin")
    with pytest.raises(UserError, match="pool.path") as err:
        _open(labeled, provider, path=missing)
    assert missing in str(err.value)


def test_path_is_required(labeled):
    with pytest.raises(UserError, match="pool.path"):
        _open(labeled, "npz", path="")


def test_foreign_and_non_hdf5(tmp_path, labeled):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as h5:
        h5["pixels"] = IMAGES
        h5["meta/ids"] = LABELS
    with pytest.raises(UserError, match="meta/ids, pixels") as err:
        _open(labeled, "hdf5", path=str(path))
    assert str(path) in str(err.value)
    assert len(_open(labeled, "hdf5", path=str(path), dataset="pixels")) == 20
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(UserError, match="not an HDF5") as err:
        _open(labeled, "hdf5", path=str(text))
    assert str(text) in str(err.value)


def test_undecodable_folder_image(tmp_path, labeled):
    options = _write_folder(tmp_path, IMAGES[:3], LABELS[:3])
    broken = tmp_path / "imgs" / "part0" / "001.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError) as err:
        _open(labeled, "folder", **options)
    assert str(broken) in str(err.value)


def test_unknown_provider_and_bad_option(tmp_path, labeled):
    with pytest.raises(UserError, match="rst-pickle, npz, npy, hdf5, folder, labeled-remainder"):
        _open(labeled, "tfrecord", path="x")
    with pytest.raises(UserError, match="pool.imagekey") as err:
        _open(labeled, "npz", path=_write_npz(tmp_path, IMAGES, LABELS)["path"], imagekey="image")
    assert "npz" in str(err.value)


def test_module_factory_plugin(labeled):
    pool = _open(labeled, "tests.data.plugin_pool:make_pool", size=7, fill=3)
    assert len(pool) == 7 and pool.read(2, 4)[:, 0, 0, 0].tolist() == [5, 6]
    with pytest.raises(UserError, match="pool.colour"):
        _open(labeled, "tests.data.plugin_pool:make_pool", colour=1)


def test_entry_point_plugin(monkeypatch, labeled):
    toy = importlib.metadata.EntryPoint(name="toy", value="tests.data.plugin_pool:make_pool", group="rst_mart.pools")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [toy] if group == "rst_mart.pools" else [])
    assert len(_open(labeled, "toy", size=4)) == 4
    with pytest.raises(UserError, match="toy"):  # listed among the installed plugins
        _open(labeled, "other")


def test_labeled_remainder(labeled):
    remainder = np.array([1, 4, 5, 11])
    pool = open_pool("labeled-remainder", {"path": ""}, labeled=labeled, remainder_index=remainder)
    assert pool.name == "labeled-remainder:toy" and len(pool) == 4
    np.testing.assert_array_equal(pool.read(1, 3), labeled.train_images[[4, 5]])
    np.testing.assert_array_equal(pool.provided_labels(), labeled.train_labels[remainder])
    other = open_pool("labeled-remainder", {}, labeled=labeled, remainder_index=remainder[:3])
    assert other.fingerprint() != pool.fingerprint()
    with pytest.raises(UserError, match="data.num_labeled"):
        open_pool("labeled-remainder", {}, labeled=labeled, remainder_index=np.empty(0, np.int64))


def test_npy_reads_are_fresh_arrays_not_views_of_the_memory_map(tmp_path):
    """A view would keep the file's pages mapped into the process: resident memory growing with the pool."""
    images = np.random.default_rng(1).integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "pool.npy", images)
    labeled = LabeledSet("toy", images[:4], np.zeros(4, np.int64), images[:4], np.zeros(4, np.int64),
                         tuple(str(k) for k in range(10)))
    pool = open_pool("npy", {"path": str(tmp_path / "pool.npy")}, labeled=labeled,
                     remainder_index=np.zeros(0, np.int64))
    rows = pool.read(7, 19)
    assert np.array_equal(rows, images[7:19])
    assert rows.flags.writeable
    base = rows
    while base is not None:  # nothing in the chain of bases is the memory map
        assert not isinstance(base, (np.memmap, mmap.mmap))
        base = getattr(base, "base", None)
    assert np.array_equal(pool.read(38, 45), images[38:40])  # clipped at the end
