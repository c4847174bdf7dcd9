"""Labeled sets: Fashion-MNIST from the Debian files, CIFAR-10 python batches, user sets, the split."""
import os
import pickle

import numpy as np
import pytest

from data.labeled import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR, labeled_split, load_labeled
from pipeline.core.errors import UserError

CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _write_batch(path, images_nhwc, labels):
    # The original batches are Python-2 pickles: bytes keys, CHW rows of 3072 bytes, labels as a list.
    rows = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    path.write_bytes(pickle.dumps({b"data": rows, b"labels": list(labels), b"batch_label": b"x"}, protocol=2))


@pytest.fixture
def tiny_cifar(tmp_path):
    """cifar-10-batches-py with 5 train batches of 4 images and a test batch of 4; returns (root, images)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(24) % 10
    batch_dir = tmp_path / "cifar-10-batches-py"
    batch_dir.mkdir()
    for b in range(5):
        _write_batch(batch_dir / f"data_batch_{b + 1}", images[4 * b:4 * b + 4], labels[4 * b:4 * b + 4])
    _write_batch(batch_dir / "test_batch", images[20:], labels[20:])
    (batch_dir / "batches.meta").write_bytes(pickle.dumps({b"label_names": CIFAR_NAMES}, protocol=2))
    return tmp_path, images, labels


def tiny_user_set(root=""):
    """A `package.module:function` dataset used by the tests below."""
    images = np.zeros((6, 8, 8, 1), np.uint8)
    return {"train_images": images, "train_labels": np.array([0, 1, 0, 1, 0, 1], np.int32),
            "test_images": images[:2], "test_labels": [0, 1], "class_names": ["a", "b"]}


def float_user_set(root=""):
    return {**tiny_user_set(root), "train_images": np.zeros((6, 8, 8, 1), np.float32)}


def test_fashion_mnist_from_debian_package():
    if not os.path.isdir(FASHION_MNIST_SYSTEM_DIR):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    ls = load_labeled("fashion-mnist")
    assert ls.train_images.shape == (60000, 28, 28, 1) and ls.test_images.shape == (10000, 28, 28, 1)
    assert ls.train_images.dtype == np.uint8 and ls.train_labels.dtype == np.int64
    assert set(np.unique(ls.train_labels)) == set(range(10)) and ls.test_labels.max() == 9
    assert ls.class_names == FASHION_MNIST_CLASSES and ls.class_names[0] == "T-shirt/top"
    assert ls.image_shape == (28, 28, 1) and ls.num_classes == 10


def test_cifar10_python_batches(tiny_cifar):
    root, images, labels = tiny_cifar
    for where in (root, root / "cifar-10-batches-py"):  # the parent or the batch dir itself
        ls = load_labeled("cifar10", root=str(where))
        np.testing.assert_array_equal(ls.train_images, images[:20])
        np.testing.assert_array_equal(ls.test_images, images[20:])
        np.testing.assert_array_equal(ls.train_labels, labels[:20])
        assert ls.train_labels.dtype == np.int64 and ls.class_names[1] == "automobile"
    assert load_labeled("cifar10", root=str(root)).fingerprint() == ls.fingerprint()


def test_cifar10_bad_label_names_the_batch(tiny_cifar):
    root, images, labels = tiny_cifar
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    _write_batch(bad, images[:4], [0, 1, 10, 2])
    with pytest.raises(UserError) as err:
        load_labeled("cifar10", root=str(root))
    assert str(bad) in str(err.value)


def test_cifar10_missing(tmp_path):
    with pytest.raises(UserError, match="data.download") as err:
        load_labeled("cifar10", root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in str(err.value)


def test_unknown_dataset():
    with pytest.raises(UserError, match="fashion-mnist, cifar10"):
        load_labeled("mnist")


def test_user_set_plugin():
    ls = load_labeled(f"{__name__}:tiny_user_set")
    assert ls.train_labels.dtype == np.int64 and ls.test_labels.tolist() == [0, 1]
    assert ls.image_shape == (8, 8, 1) and ls.class_names == ("a", "b")


def test_user_set_errors():
    with pytest.raises(UserError, match="uint8"):
        load_labeled(f"{__name__}:float_user_set")
    with pytest.raises(UserError, match="no_such_module"):
        load_labeled("no_such_module:make")
    with pytest.raises(UserError, match="no attribute"):
        load_labeled(f"{__name__}:absent")


def test_labeled_split_is_balanced_and_deterministic():
    labels = np.repeat(np.arange(4), 25)  # 4 classes x 25
    np.random.default_rng(1).shuffle(labels)
    labeled, rest = labeled_split(labels, 42, seed=3)
    assert np.bincount(labels[labeled]).tolist() == [11, 11, 10, 10]  # leftover 2 on the first classes
    assert labeled.dtype == np.int64 and np.all(np.diff(labeled) > 0) and np.all(np.diff(rest) > 0)
    assert sorted(np.concatenate([labeled, rest]).tolist()) == list(range(100))
    np.testing.assert_array_equal(labeled, labeled_split(labels, 42, seed=3)[0])
    assert not np.array_equal(labeled, labeled_split(labels, 42, seed=4)[0])
    for everything in (0, 100, 500):
        labeled, rest = labeled_split(labels, everything, seed=0)
        assert len(labeled) == 100 and len(rest) == 0
    with pytest.raises(UserError, match="data.num_labeled"):
        labeled_split(np.array([0] * 10 + [1] * 2), 8, seed=0)  # 4 of class 1 wanted, 2 exist
