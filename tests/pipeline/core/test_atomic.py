"""Atomic writers: the umask decides the mode, and a full disk is a UserError that leaves nothing behind."""
import builtins
import errno
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
import torch

from pipeline.core import atomic
from pipeline.core.atomic import (
    atomic_path,
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    current_umask,
)
from pipeline.core.errors import UserError, human_bytes, storage_error

WRITERS = {
    "text": lambda path: atomic_write_text(path, "hello\n"),
    "json": lambda path: atomic_write_json(path, {"a": 1}),
    "torch": lambda path: atomic_torch_save({"w": torch.ones(3)}, path),
    "csv": lambda path: atomic_write_csv(path, pd.DataFrame({"a": [1, 2]})),
}


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_every_writer_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    for name, write in WRITERS.items():
        write(tmp_path / name)
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    with atomic_path(tmp_path / "plain") as tmp:
        tmp.write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode


def test_umask_read_without_proc_agrees(umask, monkeypatch):
    umask(0o027)
    assert current_umask() == 0o027
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "no /proc here", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027  # the fallback put it back


class FullDiskFile:
    """A binary file that accepts `room` bytes and then fails as a full disk does."""

    def __init__(self, path, room):
        self.inner, self.room = builtins.open(path, "wb"), room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.inner.write(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def assert_disk_full_error(info, path):
    message = str(info.value)
    assert f"writing {path} failed: no space left on the device" in message
    assert " free of " in message and f"on the filesystem of {path.parent}" in message
    assert "rerun the same command: it resumes" in message


def test_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    def open_on_full_disk(file, mode="r", *args, **kwargs):
        return FullDiskFile(file, room=2000) if mode == "wb" else builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", open_on_full_disk, raising=False)
    with pytest.raises(UserError) as info:
        atomic_torch_save({"w": torch.zeros(100_000)}, path)  # 400 KB: fails midway through the tensor
    assert_disk_full_error(info, path)
    assert os.listdir(tmp_path) == ["model.pt"] and path.read_bytes() == before  # no temp file, old file intact


def test_torch_errno_less_write_failure_is_a_user_error(tmp_path, monkeypatch):
    def short_write(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(UserError, match="the write failed .*unexpected pos.* usually a full disk"):
        atomic_torch_save({}, tmp_path / "state.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded"), (errno.EROFS, "read-only"),
    (errno.EIO, "input/output error"), (errno.EACCES, "permission denied"),
])
def test_csv_and_text_writers_turn_storage_errors_into_user_errors(tmp_path, monkeypatch, code, words):
    def failing_to_csv(self, path, **kwargs):
        with open(path, "w") as f:
            f.write("half a row")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(UserError, match=words) as info:
        atomic_write_csv(tmp_path / "metrics.csv", pd.DataFrame({"a": [1]}))
    assert str(tmp_path / "metrics.csv") in str(info.value) and " free of " in str(info.value)
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_created_names_itself(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "teacher.partial"))

    monkeypatch.setattr(atomic.Path, "mkdir", read_only)
    with pytest.raises(UserError, match=f"writing {tmp_path / 'teacher.partial'} failed: the filesystem is read-only"):
        atomic_write_json(tmp_path / "teacher.partial" / "stage.json", {})


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="not a storage problem"):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("partial")
            raise ValueError("not a storage problem")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "y") as tmp:
            open(tmp_path / "missing-input")
    assert storage_error(OSError(errno.ENOENT, "No such file"), tmp_path) is None
    assert storage_error(RuntimeError("some bug"), tmp_path) is None


def test_h5py_style_message_quoting_errno_is_recognised(tmp_path):
    error = storage_error(RuntimeError("Unable to synchronously flush file (file write failed: time = ..., "
                                       "errno = 28, error message = 'No space left on device')"), tmp_path / "p.h5")
    assert error is not None and "no space left on the device" in str(error)


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 2**30, 3 * 2**40, 2**52)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 GiB", "3.0 TiB", "4096.0 TiB"]


def _mount_tmpfs(folder, size):
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs; the injected ENOSPC tests cover the logic")
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here ({proc.stderr.decode().strip()}); the injected ENOSPC tests "
                    "cover the logic")


def test_real_full_disk_on_a_tmpfs(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "512k")
    try:
        # In a child process: what the pipeline would print, and no crash on the way out.
        script = ("import torch, sys\nfrom pipeline.core.atomic import atomic_torch_save\n"
                  "from pipeline.core.errors import UserError\n"
                  "try:\n    atomic_torch_save({'w': torch.zeros(1_000_000)}, sys.argv[1])\n"
                  "except UserError as e:\n    print(e)\n")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        proc = subprocess.run([sys.executable, "-c", script, str(disk / "model.pt")], cwd=root, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert f"writing {disk / 'model.pt'} failed: no space left on the device" in proc.stdout
        assert "free of 512.0 KiB" in proc.stdout
        assert os.listdir(disk) == []
        atomic_torch_save({"w": torch.zeros(10_000)}, disk / "model.pt")  # what fits still works
        assert torch.load(disk / "model.pt", weights_only=True)["w"].shape == (10_000,)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_bug_raised_while_handling_a_full_disk_stays_a_bug():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            {}["missing"]
    except KeyError as bug:
        assert storage_error(bug, "/x") is None
