"""file_digest: hashed once across processes, hashed again when the file changes, never fails on its cache."""
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import fingerprint as fp

ROOT = Path(__file__).resolve().parents[3]  # the repository root
OLD_NS = 1_600_000_000 * 10**9  # an mtime well outside the racy window


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(fp.CACHE_DIR_ENV, str(directory))
    monkeypatch.setattr(fp, "_memo", {})  # as in a fresh process
    return directory


def _write(path: Path, data: bytes, mtime_ns: int = OLD_NS) -> Path:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _digest_in_new_process(path: Path) -> tuple[str, int]:
    """file_digest in a fresh interpreter, with the bytes that process read (Linux's /proc/self/io rchar)."""
    code = ("import sys; from pipeline.core.fingerprint import file_digest\n"
            "def rchar(): return int(open('/proc/self/io').read().split('rchar:')[1].split()[0])\n"
            "before = rchar(); digest = file_digest(sys.argv[1]); print(digest, rchar() - before)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=os.environ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process read counter")
def test_second_process_does_not_read_the_file(cache_dir, tmp_path):
    size = 8 << 20
    path = _write(tmp_path / "pool.bin", os.urandom(size))
    first, first_read = _digest_in_new_process(path)
    second, second_read = _digest_in_new_process(path)
    assert first == second == fp.file_digest(path)
    assert first_read >= size  # the first process hashed the file
    assert second_read < size // 8  # the second only looked it up (the database is a few KiB)


def _forbid_reading(monkeypatch):
    def no_hash(p, st):
        raise AssertionError(f"{p} was hashed again")
    monkeypatch.setattr(fp, "hash_file", no_hash)


def test_database_answers_a_fresh_memo(cache_dir, tmp_path, monkeypatch):
    path = _write(tmp_path / "a.bin", b"x" * 1000)
    digest = fp.file_digest(path)
    monkeypatch.setattr(fp, "_memo", {})
    _forbid_reading(monkeypatch)
    assert fp.file_digest(path) == digest
    assert (cache_dir / fp._DB_NAME).is_file()


@pytest.mark.parametrize("change", ["content and mtime", "mtime only", "inode (replaced by rename)"])
def test_a_changed_file_is_hashed_again(cache_dir, tmp_path, monkeypatch, change):
    path = _write(tmp_path / "a.bin", b"a" * 1000)
    before = fp.file_digest(path)
    monkeypatch.setattr(fp, "_memo", {})
    if change == "content and mtime":  # same size: the size alone would not notice
        _write(path, b"b" * 1000, OLD_NS + 10**9)
    elif change == "mtime only":
        os.utime(path, ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    else:
        replacement = _write(tmp_path / "b.bin", b"b" * 1000)  # same size and mtime, new inode
        os.replace(replacement, path)
    hashed = []
    real_hash = fp.hash_file
    monkeypatch.setattr(fp, "hash_file", lambda p, st: hashed.append(p) or real_hash(p, st))
    after = fp.file_digest(path)
    assert hashed == [path.resolve()]
    assert (after != before) == (change != "mtime only")


def test_an_in_place_edit_that_restores_size_mtime_and_inode_is_hashed_again(cache_dir, tmp_path):
    """The edit git's index catches by ctime: same bytes count, same inode, the old mtime put back."""
    path = _write(tmp_path / "pool.bin", b"a" * 4096)
    before, _ = _digest_in_new_process(path)
    inode = path.stat().st_ino
    with open(path, "r+b") as f:  # in place: the inode stays
        f.write(b"b")
    os.utime(path, ns=(OLD_NS, OLD_NS))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (4096, OLD_NS, inode)
    after, read = _digest_in_new_process(path)
    assert read >= 4096 and after != before == hashlib.sha256(b"a" * 4096).hexdigest()
    assert after == hashlib.sha256(b"b" + b"a" * 4095).hexdigest()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_never_read(cache_dir, tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pool.fifo"
        os.mkfifo(path)  # open() without O_NONBLOCK would wait here for a writer forever
    else:
        path = Path("/dev/zero")  # read() would never end
    code = "import sys; from pipeline.core.fingerprint import file_digest; file_digest(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "NotRegularFile" in proc.stderr
    assert ("a FIFO" if kind == "fifo" else "a character device") in proc.stderr


def test_one_row_per_path(cache_dir, tmp_path):
    path = _write(tmp_path / "a.bin", b"a")
    fp.file_digest(path)
    _write(path, b"b", OLD_NS + 1)
    fp.file_digest(path)
    with sqlite3.connect(cache_dir / fp._DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM digests").fetchone()[0] == 1


def test_rows_of_deleted_files_are_pruned_past_the_limit(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "_PRUNE_ABOVE_ROWS", 3)
    files = [_write(tmp_path / f"{i}.bin", b"x") for i in range(3)]
    for file in files:
        fp.file_digest(file)
    files[0].unlink()
    fp.file_digest(_write(tmp_path / "3.bin", b"y"))  # the fourth row: over the limit
    with sqlite3.connect(cache_dir / fp._DB_NAME) as db:
        kept = sorted(Path(p).name for (p,) in db.execute("SELECT path FROM digests"))
    assert kept == ["1.bin", "2.bin", "3.bin"]


def test_a_freshly_written_file_is_not_remembered(cache_dir, tmp_path, monkeypatch):
    """Its mtime could still be shared by a second write within the filesystem's timestamp granularity."""
    now = time.time_ns()
    path = _write(tmp_path / "new.bin", b"fresh", now)
    first = fp.file_digest(path)
    _write(path, b"fResh", now)  # same size, same inode, same mtime tick
    assert fp.file_digest(path) != first
    assert not sqlite3.connect(cache_dir / fp._DB_NAME).execute("SELECT * FROM digests").fetchall()


@pytest.mark.parametrize("where", ["below a regular file", "corrupt database"])
def test_an_unusable_cache_falls_back_to_hashing(tmp_path, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory would go")
    if where == "below a regular file":  # mkdir fails even for root
        monkeypatch.setenv(fp.CACHE_DIR_ENV, str(blocker / "cache"))
    else:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / fp._DB_NAME).write_bytes(b"not a database" * 100)
        monkeypatch.setenv(fp.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(fp, "_memo", {})
    path = _write(tmp_path / "a.bin", b"abc")
    assert fp.file_digest(path) == hashlib.sha256(b"abc").hexdigest()
    assert fp.file_digest(path) == hashlib.sha256(b"abc").hexdigest()  # from the in-process memo


def test_sampled_digest_above_the_limit(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_LIMIT_BYTES", 1000)
    path = _write(tmp_path / "big.bin", bytes(range(256)) * 100)
    sampled = fp.file_digest(path)
    assert sampled != hashlib.sha256(path.read_bytes()).hexdigest()
    os.utime(path, ns=(OLD_NS + 1, OLD_NS + 1))  # the sample includes the mtime: a touch re-fingerprints
    assert fp.file_digest(path) != sampled


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(fp.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fp.user_cache_dir() == tmp_path / "xdg" / "rst-mart"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fp.user_cache_dir() == Path.home() / ".cache" / "rst-mart"
    monkeypatch.setenv(fp.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert fp.user_cache_dir() == tmp_path / "mine"


def test_module_stays_light():
    code = "import sys, pipeline.core.fingerprint; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
