"""read_regular and the config reader: a FIFO, a device or a huge file exits 2 at once, never hangs or fills memory."""
import os

import pytest

from pipeline.core.bounded import NotRegularFile, TooLarge, read_regular
from tests.conftest import run_cli


def test_reads_a_small_regular_file(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert read_regular(tmp_path / "a", 3) == b"abc"
    with pytest.raises(TooLarge):
        read_regular(tmp_path / "a", 2)


def test_refuses_fifos_devices_directories_and_unfollowed_links(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # no writer: a plain open() would block here forever
    with pytest.raises(NotRegularFile, match="a FIFO"):
        read_regular(tmp_path / "fifo", 100)
    with pytest.raises(NotRegularFile, match="a character device"):
        read_regular("/dev/zero", 100)
    with pytest.raises(NotRegularFile, match="a directory"):
        read_regular(tmp_path, 100)
    (tmp_path / "link").symlink_to("/dev/zero")
    with pytest.raises(NotRegularFile, match="a symbolic link"):
        read_regular(tmp_path / "link", 100, follow_symlinks=False)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "2 MiB file"])
def test_a_config_that_is_not_a_small_regular_file_exits_2_at_once(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "config.toml"
        os.mkfifo(path)
        expected = "is a FIFO (named pipe), not a regular file"
    elif kind == "2 MiB file":
        path = tmp_path / "big.toml"
        path.write_text("# padding\n" * (2 << 17))
        expected = "is over 1 MiB"
    else:
        path, expected = "/dev/zero", "is a character device, not a regular file"
    proc = run_cli("status", "--config", path, "--workdir", tmp_path / "w", check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"config file {path} {expected}" in " ".join(proc.stderr.split())
