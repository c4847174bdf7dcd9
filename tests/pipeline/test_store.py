"""The store's safety with real processes and real files: it deletes only what it wrote, gc keeps what a
live, moved or vanished work dir needs, and nothing on disk makes a command hang."""
import json
import os
import shutil

import pytest

from tests.conftest import run_cli
from tests.pipeline.test_races import worker


def entries(store, stage):
    return sorted(p for p in (store / stage).iterdir() if p.is_dir() and not p.name.endswith(".partial"))


def snapshot(directory):
    """Every path below `directory` with what it is (file bytes, link target, or dir), to show nothing moved."""
    found = {}
    for path in sorted(directory.rglob("*")):
        found[str(path.relative_to(directory))] = (os.readlink(path) if path.is_symlink() else
                                                   path.read_bytes() if path.is_file() else "dir")
    return found


@pytest.fixture
def built(tmp_path):
    """A store with teacher and mart built for work dir `w`."""
    store = tmp_path / "store"
    done = worker(tmp_path / "w", store, "--stages", "teacher,mart", "--hold", "none")
    assert done.returncode == 0, done.stderr
    return store


# -- 1. nothing the store did not write is deleted ------------------------------------------------------
def test_a_work_dir_equal_to_the_store_is_refused_before_anything_moves(tmp_path, built):
    before = snapshot(built)
    for workdir in (built, built / "teacher", built / "sub" / "w"):
        proc = worker(workdir, built, "--stages", "teacher,mart", "--hold", "none")
        assert proc.returncode == 2, proc.stdout
        assert f"the work dir {workdir} is inside the stage store {built}" in " ".join(proc.stderr.split())
    assert snapshot(built) == before
    assert all((e / "stage.json").is_file() and not e.is_symlink() for e in entries(built, "teacher"))


def test_a_store_inside_a_stage_link_path_is_refused(tmp_path):
    store = tmp_path / "w" / "teacher" / "store"
    proc = worker(tmp_path / "w", store, "--hold", "none")
    assert proc.returncode == 2 and "is inside" in proc.stderr and "where the work dir's teacher link goes" in \
        " ".join(proc.stderr.split())
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("what", ["notes", "foreign stage.json", "file"])
def test_a_stage_named_thing_rst_mart_did_not_write_is_refused_and_kept(tmp_path, built, what):
    teacher = tmp_path / "w2" / "teacher"
    if what == "file":
        teacher.parent.mkdir()
        teacher.write_text("my teacher notes")
    else:
        teacher.mkdir(parents=True)
        (teacher / "notes.txt").write_text("mine")
        if what == "foreign stage.json":  # a record that does not prove a finished teacher
            (teacher / "stage.json").write_text(json.dumps({"stage": "teacher", "fingerprint": "0" * 64,
                                                            "outputs": {"model.pt": {"size": 1}}}))
    before = snapshot(tmp_path / "w2")
    proc = worker(tmp_path / "w2", built, "--stages", "teacher,mart", "--hold", "none")
    assert proc.returncode == 2, proc.stdout
    message = " ".join(proc.stderr.split())
    assert f"{teacher} is in the way of the work dir's teacher link" in message and f"mv {teacher}" in message
    assert {k: v for k, v in snapshot(tmp_path / "w2").items() if k != ".lock"} == before  # the run's lock file
    assert "teacher:" not in proc.stdout  # refused before any stage was looked at


def test_a_finished_stage_from_before_the_store_is_still_adopted(tmp_path, built):
    entry = entries(built, "teacher")[0]
    shutil.copytree(entry, tmp_path / "w2" / "teacher")  # a plain directory with a proving stage.json
    proc = worker(tmp_path / "w2", built, "--hold", "none")
    assert proc.returncode == 0, proc.stderr
    assert "teacher: cached" in proc.stdout
    assert (tmp_path / "w2" / "teacher").is_symlink() and (tmp_path / "w2" / "teacher").resolve() == entry


def test_gc_leaves_directories_no_stage_json_names(tmp_path, built):
    mine = built / "teacher" / "my-notes"
    mine.mkdir()
    fake = built / "teacher" / ("a" * 64)
    fake.mkdir()
    (fake / "data.bin").write_bytes(b"x")
    out = run_cli("gc", "--store", built, timeout=60).stdout
    assert f"leaving {mine} alone" in out and f"leaving {fake} alone" in out
    assert (fake / "data.bin").exists() and mine.is_dir()


# -- 2. gc keeps what a live, moved or vanished work dir needs ---------------------------------------------
def test_a_moved_work_dir_keeps_its_entries_and_is_recognised_again(tmp_path, built):
    kept = {s: (tmp_path / "w" / s).resolve() for s in ("teacher", "mart")}
    (tmp_path / "w").rename(tmp_path / "w-final")
    out = run_cli("gc", "--store", built, timeout=60).stdout
    assert "0 unreferenced entries" in out
    assert "keeping 2 entries" in out and f"of {tmp_path / 'w'}, a registered work dir that is no longer there" in out
    assert f"--forget {tmp_path / 'w'}" in out
    assert all((e / "out.txt").exists() for e in kept.values())
    assert (tmp_path / "w-final" / "mart" / "out.txt").read_text() == "built then mart"
    # The next run in its new place finds its record by the id file: the old path is no longer listed.
    proc = worker(tmp_path / "w-final", built, "--stages", "teacher,mart", "--hold", "none")
    assert proc.returncode == 0 and "mart: cached" in proc.stdout
    out = run_cli("gc", "--store", built, timeout=60).stdout
    assert "no longer there" not in out and "0 unreferenced entries" in out
    records = list((built / "workdirs").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["path"] == str(tmp_path / "w-final")


def test_gc_workdir_registers_a_moved_work_dir(tmp_path, built):
    (tmp_path / "w").rename(tmp_path / "w2")
    out = run_cli("gc", "--store", built, "--workdir", tmp_path / "w2", timeout=60).stdout
    assert "no longer there" not in out and "0 unreferenced entries" in out


def test_a_deleted_work_dir_keeps_its_entries_until_forgotten(tmp_path, built):
    gone = tmp_path / "w"
    linked = [(gone / s).resolve() for s in ("teacher", "mart")]
    shutil.rmtree(gone)
    out = run_cli("gc", "--store", built, timeout=60).stdout
    assert "0 unreferenced entries" in out and "keeping 2 entries" in out
    dry = run_cli("gc", "--store", built, "--forget", gone, "--dry-run", timeout=60).stdout
    assert "2 unreferenced entries" in dry and all(e.exists() for e in linked)
    out = run_cli("gc", "--store", built, "--forget", gone, "--keep", "0", timeout=60).stdout
    assert f"forgot {gone}" in out and "2 unreferenced entries" in out
    assert not any(e.exists() for e in linked)
    assert not list((built / "workdirs").glob("*.json"))


def test_forgetting_a_work_dir_that_still_exists_is_refused(tmp_path, built):
    proc = run_cli("gc", "--store", built, "--forget", tmp_path / "w", check=False, timeout=60)
    assert proc.returncode == 2 and "that work dir still exists" in " ".join(proc.stderr.split())
    proc = run_cli("gc", "--store", built, "--forget", tmp_path / "nowhere", check=False, timeout=60)
    assert proc.returncode == 2 and "no work dir is registered at that path" in " ".join(proc.stderr.split())
    assert len(entries(built, "teacher")) == 1 and len(list((built / "workdirs").glob("*.json"))) == 1


def test_a_copied_work_dir_gets_its_own_id(tmp_path, built):
    shutil.copytree(tmp_path / "w", tmp_path / "copy", symlinks=True)
    proc = worker(tmp_path / "copy", built, "--stages", "teacher,mart", "--hold", "none")
    assert proc.returncode == 0, proc.stderr
    ids = {(tmp_path / d / ".rst-mart-id").read_text() for d in ("w", "copy")}
    assert len(ids) == 2
    paths = {json.loads(r.read_text())["path"] for r in (built / "workdirs").glob("*.json")}
    assert paths == {str(tmp_path / "w"), str(tmp_path / "copy")}


def test_a_vanished_work_dir_registered_by_an_older_version_blocks_removal(tmp_path, built):
    import hashlib

    legacy = str(tmp_path / "old-run")
    shutil.rmtree(tmp_path / "w")
    shutil.rmtree(built / "workdirs")  # as an older version left it: no id records at all
    (built / "workdirs").mkdir()
    (built / "workdirs" / hashlib.sha256(legacy.encode()).hexdigest()[:32]).write_text(legacy + "\n")
    out = run_cli("gc", "--store", built, "--keep", "0", timeout=60).stdout
    assert "registered by an older rst-mart" in out and "2 unreferenced entries" in out and "0 removed" in out
    assert len(entries(built, "teacher")) == 1
    out = run_cli("gc", "--store", built, "--forget", legacy, "--keep", "0", timeout=60).stdout
    assert "2 unreferenced entries" in out and not entries(built, "teacher")


# -- 3. nothing on disk makes a command hang ----------------------------------------------------------------
def _record(store, stage):
    return entries(store, stage)[0] / "stage.json"


@pytest.mark.parametrize("name", ["../../../dev/zero", "/dev/zero", "sub/../../out.txt", ".."])
def test_an_output_name_outside_the_entry_is_stale_not_read(tmp_path, built, name):
    path = _record(built, "teacher")
    record = json.loads(path.read_text())
    record["outputs"] = {name: {"size": 0, "sha256": "0" * 64}}
    path.write_text(json.dumps(record))
    status = worker(tmp_path / "w", built, "--stages", "teacher", "--status")  # as `status --verify`
    assert status.returncode == 0
    expected = f"teacher: stale, stage.json lists output {name!r}, which is not a file name inside the entry"
    assert expected in status.stdout
    proc = worker(tmp_path / "w", built, "--stages", "teacher", "--hold", "none")  # rebuilt, in seconds
    assert proc.returncode == 0 and "teacher: stale, stage.json lists output" in proc.stdout
    assert json.loads(_record(built, "teacher").read_text())["outputs"].keys() == {"out.txt"}


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero"])
def test_a_stage_json_or_output_that_is_not_a_regular_file_is_never_read(tmp_path, built, kind):
    entry = entries(built, "teacher")[0]
    if kind == "fifo":
        (entry / "stage.json").unlink()
        os.mkfifo(entry / "stage.json")
        expected = "teacher: missing"
    else:
        (entry / "out.txt").unlink()
        (entry / "out.txt").symlink_to("/dev/zero")
        record = json.loads((entry / "stage.json").read_text())
        record["outputs"]["out.txt"]["size"] = 0
        (entry / "stage.json").write_text(json.dumps(record))
        expected = "teacher: stale, output out.txt is a symbolic link, not a regular file"
    status = worker(tmp_path / "w", built, "--stages", "teacher", "--status")
    assert status.returncode == 0 and expected in status.stdout
    proc = worker(tmp_path / "w", built, "--stages", "teacher", "--hold", "none")
    assert proc.returncode == 0 and "teacher: ran in" in proc.stdout


@pytest.mark.parametrize("what", ["registry record", "id file"])
def test_a_fifo_in_the_registry_or_as_the_id_file_does_not_hang(tmp_path, built, what):
    if what == "registry record":  # unreadable: gc stops (exit 2) rather than guess, and does not hang
        fifo = built / "workdirs" / ("b" * 32 + ".json")
        os.mkfifo(fifo)
        proc = run_cli("gc", "--store", built, "--dry-run", check=False, timeout=60)
        assert proc.returncode == 2 and f"registry record {fifo} cannot be read (it is a FIFO" in \
            " ".join(proc.stderr.split())
    else:
        (tmp_path / "w" / ".rst-mart-id").unlink()
        os.mkfifo(tmp_path / "w" / ".rst-mart-id")
        out = run_cli("gc", "--store", built, "--dry-run", timeout=60).stdout
        assert "unreferenced entries" in out


def test_a_new_work_dir_at_a_moved_ones_path_keeps_both_until_the_old_is_forgotten(tmp_path, built):
    old_entries = [(tmp_path / "w" / s).resolve() for s in ("teacher", "mart")]
    shutil.rmtree(tmp_path / "w")
    assert worker(tmp_path / "w", built, "--seed", "1", "--hold", "none").returncode == 0  # a new work dir, same path
    out = run_cli("gc", "--store", built, timeout=60).stdout
    assert "keeping 2 entries" in out and "0 unreferenced entries" in out
    out = run_cli("gc", "--store", built, "--forget", tmp_path / "w", "--keep", "0", timeout=60).stdout
    assert "2 unreferenced entries" in out and not any(e.exists() for e in old_entries)
    assert (tmp_path / "w" / "teacher" / "out.txt").exists()  # the new one's entry stays


def test_a_stage_link_pointing_at_the_root_is_replaced_not_blamed_on_the_store(tmp_path, built):
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "teacher").symlink_to("/")
    proc = worker(tmp_path / "w2", built, "--hold", "none")
    assert proc.returncode == 0, proc.stderr
    assert "is inside" not in proc.stderr
    assert (tmp_path / "w2" / "teacher").resolve() == entries(built, "teacher")[0]


def test_printed_commands_are_shell_quoted(tmp_path, built):
    odd = tmp_path / "my runs; rm -rf ~"
    (odd / "teacher").mkdir(parents=True)
    (odd / "teacher" / "notes.txt").write_text("mine")
    proc = worker(odd, built, "--hold", "none")
    assert proc.returncode == 2
    assert f"mv '{odd / 'teacher'}' '{odd / 'teacher'}.mine'" in " ".join(proc.stderr.split())
