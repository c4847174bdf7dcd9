"""The store against a lab's habits (issue 28), with real processes and real files: copies of work dirs
and of whole projects, broken registry records, edited files, entries replaced by links, full disks."""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import run_cli, small_disk
from tests.pipeline.test_races import worker
from tests.pipeline.test_store import entries, snapshot

DAY = 86400


def age(entry, days):
    """Make `entry` look last built and used `days` ago (its mtime and its .used marker's)."""
    then = time.time() - days * DAY
    for path in (entry, entry.with_name(entry.name + ".used")):
        if os.path.lexists(path):
            os.utime(path, (then, then), follow_symlinks=False)


def files(directory):
    """snapshot() less the store's lock file, which gc writes its holder into."""
    return {k: v for k, v in snapshot(directory).items() if not k.endswith("store.lock")}


def status(workdir, store):
    """`python -m pipeline status` in a work dir, as a user types it (the real stages: fast, nothing runs)."""
    return run_cli("status", "--workdir", workdir, "--set", f"run.store={store}", timeout=120)


def message(proc):
    return " ".join(proc.stderr.split())


@pytest.fixture
def old(tmp_path):
    """A store with teacher and mart built for work dir `w` 20 days ago."""
    store = tmp_path / "store"
    assert worker(tmp_path / "w", store, "--stages", "teacher,mart", "--hold", "none").returncode == 0
    for stage in ("teacher", "mart"):
        age(entries(store, stage)[0], 20)
    return store


# -- 1. copies: cp -r of a work dir, cp -a of a whole project ---------------------------------------------
def test_a_work_dir_copy_no_command_has_seen_keeps_its_entries(tmp_path, old):
    copied = [(tmp_path / "w" / s).resolve() for s in ("teacher", "mart")]
    shutil.copytree(tmp_path / "w", tmp_path / "b", symlinks=True)  # cp -r: links stay links, b unregistered
    assert worker(tmp_path / "w", old, "--stages", "teacher,mart", "--seed", "1", "--hold", "none").returncode == 0
    out = run_cli("gc", "--store", old, timeout=60).stdout  # the run in w stopped using them just now
    assert all(f"keeping {e} (0.0 MiB): unreferenced, but used" in out for e in copied), out
    assert "within --keep 14d" in out and "2 unreferenced entries: 2 kept" in out and "0 removed" in out
    assert (tmp_path / "b" / "mart" / "out.txt").read_text() == "built then mart"
    # Any command in the copy registers it under an id of its own; then nothing it links to is unreferenced.
    status(tmp_path / "b", old)
    assert (tmp_path / "b" / ".rst-mart-id").read_text() != (tmp_path / "w" / ".rst-mart-id").read_text()
    paths = {json.loads(r.read_text())["path"] for r in (old / "workdirs").glob("*.json")}
    assert paths == {str(tmp_path / "w"), str(tmp_path / "b")}
    out = run_cli("gc", "--store", old, "--keep", "0", timeout=60).stdout
    assert "0 unreferenced entries" in out and all((e / "out.txt").exists() for e in copied)


def test_without_the_grace_period_an_unseen_copy_would_lose_its_entries(tmp_path, old):
    """What the grace period is for: the dry run with --keep 0 lists the copy's entries as removable."""
    shutil.copytree(tmp_path / "w", tmp_path / "b", symlinks=True)
    assert worker(tmp_path / "w", old, "--stages", "teacher,mart", "--seed", "1", "--hold", "none").returncode == 0
    for stage in ("teacher", "mart"):
        age((tmp_path / "b" / stage).resolve(), 20)  # as if the run in w had been 20 days ago
    dry = run_cli("gc", "--store", old, "--dry-run", timeout=60).stdout
    assert "2 unreferenced entries: 0 kept" in dry and "2 to remove" in dry and "dry run: nothing removed" in dry
    assert f"would remove {(tmp_path / 'b' / 'teacher').resolve()} (0.0 MiB): unreferenced, last used 20.0 d ago" in dry
    assert (tmp_path / "b" / "teacher" / "out.txt").exists()


def test_gc_of_a_copied_project_stops_until_told_which_records_are_its_own(tmp_path):
    project = tmp_path / "project"
    store = project / "runs" / ".store"
    assert worker(project / "runs" / "w", store, "--stages", "teacher,mart", "--hold", "none").returncode == 0
    subprocess.run(["cp", "-a", str(project), str(tmp_path / "copy")], check=True)
    copy_store, copy_w = tmp_path / "copy" / "runs" / ".store", tmp_path / "copy" / "runs" / "w"
    before = files(tmp_path / "copy")
    proc = run_cli("gc", "--store", copy_store, "--keep", "0", check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"names the work dir {project / 'runs' / 'w'}, whose stage links point into another store ({store})" \
        in message(proc) and "nothing was removed" in message(proc)
    assert run_cli("gc", "--store", copy_store, "--dry-run", check=False, timeout=60).returncode == 2
    assert files(tmp_path / "copy") == before
    status(copy_w, copy_store)  # registers the copy in the copy's store, under a new id
    out = run_cli("gc", "--store", copy_store, "--forget", project / "runs" / "w", "--keep", "0", timeout=60).stdout
    assert f"forgot {project / 'runs' / 'w'}" in out and "0 unreferenced entries" in out
    assert (copy_w / "mart" / "out.txt").read_text() == "built then mart"
    assert (copy_w / "teacher").resolve().parent.parent == copy_store
    assert run_cli("gc", "--store", store, "--keep", "0", timeout=60).returncode == 0  # the original is untouched
    assert (project / "runs" / "w" / "mart" / "out.txt").exists()


def test_status_reading_an_unreferenced_entry_restarts_its_grace_period(tmp_path, old):
    assert worker(tmp_path / "w", old, "--seed", "1", "--hold", "none").returncode == 0
    seed0 = [e for e in entries(old, "teacher") if e != (tmp_path / "w" / "teacher").resolve()][0]
    age(seed0, 20)
    dry = run_cli("gc", "--store", old, "--dry-run", timeout=60).stdout
    assert f"would remove {seed0}" in dry
    planned = worker(tmp_path / "w", old, "--seed", "0", "--status")  # a status for the seed-0 config reads it
    assert planned.returncode == 0 and "teacher: fresh" in planned.stdout
    out = run_cli("gc", "--store", old, timeout=60).stdout
    assert re.search(rf"keeping {seed0} \(0.0 MiB\): unreferenced, but used \d+ s ago", out) and seed0.is_dir()


def test_gc_prints_commands_a_shell_takes_as_they_are(tmp_path, old):
    odd = tmp_path / "runs; rm -rf ~"
    assert worker(odd, old, "--hold", "none").returncode == 0
    shutil.rmtree(odd)
    out = run_cli("gc", "--store", old, timeout=60).stdout
    assert f"`python -m pipeline gc --store {old} --forget '{odd}'`" in out
    assert run_cli("gc", "--store", old, "--forget", odd, timeout=60).returncode == 0  # as printed, it works


# -- 1. records gc cannot read ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "foreign id", "not a file"])
def test_an_unreadable_registry_record_stops_gc_and_deletes_nothing(tmp_path, old, damage):
    assert worker(tmp_path / "w2", old, "--stages", "teacher,mart", "--seed", "1", "--hold", "none").returncode == 0
    record = old / "workdirs" / f"{(tmp_path / 'w2' / '.rst-mart-id').read_text().strip()}.json"
    if damage == "truncated":
        record.write_bytes(record.read_bytes()[:100])
    elif damage == "foreign id":
        record.write_text(json.dumps({"id": "c" * 32, "path": str(tmp_path / "w2"), "links": {}}))
    else:
        record.unlink()
        record.mkdir()
    for stage in ("teacher", "mart"):
        for entry in entries(old, stage):
            age(entry, 20)
    before = files(old)
    for dry in ([], ["--dry-run"]):
        proc = run_cli("gc", "--store", old, "--keep", "0", *dry, check=False, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"registry record {record} cannot be read" in message(proc) and "nothing was removed" in message(proc)
        assert f"mv {record} {record}.broken" in message(proc)
    assert files(old) == before
    if damage != "not a file":  # any command in the work dir rewrites its record
        status(tmp_path / "w2", old)
        assert run_cli("gc", "--store", old, "--keep", "0", timeout=60).returncode == 0
        assert (tmp_path / "w2" / "mart" / "out.txt").exists() and (tmp_path / "w" / "mart" / "out.txt").exists()


# -- 2. nothing is deleted that the store cannot prove it wrote ------------------------------------------
@pytest.mark.parametrize("case", ["edited, the store has it", "edited, the store lacks it", "another run's bytes"])
def test_an_adopted_folder_with_other_bytes_is_kept_where_it_is(tmp_path, old, case):
    from pipeline.store import output_digest

    entry = entries(old, "teacher")[0]
    legacy = tmp_path / "w2" / "teacher"
    shutil.copytree(entry, legacy)  # a stage folder as earlier versions wrote it
    (legacy / "out.txt").write_text("BUILT")  # same size, other bytes
    if case == "edited, the store lacks it":
        shutil.rmtree(tmp_path / "w")
        shutil.rmtree(entry)
    if case == "another run's bytes":  # its own record matches it: only the store's entry tells them apart
        record = json.loads((legacy / "stage.json").read_text())
        record["outputs"]["out.txt"] = output_digest(legacy / "out.txt")
        (legacy / "stage.json").write_text(json.dumps(record))
    proc = worker(tmp_path / "w2", old, "--hold", "none")
    assert proc.returncode == 2, proc.stdout
    assert f"{legacy} is in the way of the work dir's teacher link" in message(proc)
    why = "differs from the one in the store's entry" if case == "another run's bytes" else "out.txt changed (checksum)"
    assert why in message(proc)
    assert (legacy / "out.txt").read_text() == "BUILT" and not legacy.is_symlink()


def test_gc_leaves_an_unreferenced_entry_whose_outputs_were_edited(tmp_path, old):
    assert worker(tmp_path / "w", old, "--seed", "1", "--hold", "none").returncode == 0
    edited = [e for e in entries(old, "teacher") if e != (tmp_path / "w" / "teacher").resolve()][0]
    (edited / "out.txt").write_text("BUILT")
    age(edited, 20)
    out = run_cli("gc", "--store", old, "--keep", "0", timeout=60).stdout
    assert f"leaving {edited} alone: output out.txt changed (checksum): those bytes are not provably" in out
    assert (edited / "out.txt").read_text() == "BUILT"


# -- 4. entries replaced by links, leftovers of a crash --------------------------------------------------
def test_an_entry_replaced_by_a_symlink_is_moved_aside_not_followed(tmp_path, old):
    entry = entries(old, "teacher")[0]
    elsewhere = tmp_path / "elsewhere"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    before = snapshot(elsewhere)
    for _ in range(2):  # a second run (as a later --force would) must not trip over what the first left
        proc = worker(tmp_path / "w", old, "--hold", "none")
        assert proc.returncode == 0, proc.stderr
        if _ == 0:
            assert "teacher: stale, the store's entry is a symbolic link" in proc.stdout
            assert f"moved {entry} aside to {entry}.aside-" in proc.stdout and "left it there" in proc.stdout
    assert entry.is_dir() and not entry.is_symlink() and (entry / "out.txt").read_text() == "built"
    assert snapshot(elsewhere) == before
    aside = [p for p in entry.parent.iterdir() if ".aside-" in p.name]
    assert len(aside) == 1 and aside[0].is_symlink() and aside[0].resolve() == elsewhere
    out = run_cli("gc", "--store", old, "--keep", "0", timeout=60).stdout
    assert f"leaving {aside[0]} alone" in out and aside[0].is_symlink()


def test_a_foreign_directory_at_an_entrys_place_is_moved_aside_not_deleted(tmp_path):
    store = tmp_path / "store"
    assert worker(tmp_path / "w", store, "--hold", "none").returncode == 0
    entry = entries(store, "teacher")[0]
    shutil.rmtree(entry)
    entry.mkdir()
    (entry / "thesis.tex").write_text("mine")  # a user's directory under an entry's name
    proc = worker(tmp_path / "w", store, "--hold", "none")
    assert proc.returncode == 0, proc.stderr
    assert f"moved {entry} aside to {entry}.aside-" in proc.stdout and "has no readable stage.json" in proc.stdout
    aside = [p for p in entry.parent.iterdir() if ".aside-" in p.name]
    assert (aside[0] / "thesis.tex").read_text() == "mine" and (entry / "out.txt").read_text() == "built"


@pytest.mark.parametrize("leftover", ["directory", "symlink to /"])
def test_a_leftover_old_entry_never_blocks_a_rebuild(tmp_path, old, leftover):
    entry = entries(old, "teacher")[0]
    stale = entry.with_name(entry.name + ".old")
    if leftover == "directory":
        stale.mkdir()
        (stale / "mine.txt").write_text("mine")
    else:
        stale.symlink_to("/")
    (entry / "out.txt").write_text("BUILT")  # edited in place: the run rebuilds, the edit is set aside
    proc = worker(tmp_path / "w", old, "--hold", "none")
    assert proc.returncode == 0, proc.stderr
    assert "teacher: stale, output out.txt changed (checksum)" in proc.stdout
    assert (entry / "out.txt").read_text() == "built"
    aside = [p for p in entry.parent.iterdir() if ".aside-" in p.name]
    assert len(aside) == 1 and (aside[0] / "out.txt").read_text() == "BUILT"
    assert os.path.lexists(stale)  # not ours to remove


def test_a_forced_rebuild_of_a_provably_own_entry_leaves_nothing_behind(tmp_path, old):
    entry = entries(old, "teacher")[0]
    (entry / "stage.json").write_text(json.dumps({**json.loads((entry / "stage.json").read_text()),
                                                  "code_version": "older"}))  # still provably ours
    from pipeline.store import Store

    partial = old / "teacher" / f"{entry.name}.partial"
    shutil.copytree(entry, partial)
    lines = []
    Store(old).commit("teacher", entry.name, partial, log=lines.append)
    assert lines == [] and [p.name for p in (old / "teacher").iterdir() if ".aside-" in p.name] == []


# -- 4. a full disk ----------------------------------------------------------------------------------------
def fill(disk):
    """Write a file on `disk` until the filesystem refuses another byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (disk / "probe").write_bytes(b"x" * 4096)


def test_gc_frees_a_full_store_that_gc_never_ran_on(tmp_path):
    with small_disk(tmp_path / "disk", "2m"):
        store = tmp_path / "disk" / "store"
        for seed in ("0", "1"):
            assert worker(tmp_path / "disk" / "w", store, "--seed", seed, "--hold", "none").returncode == 0
        unused = [e for e in entries(store, "teacher") if e != (tmp_path / "disk" / "w" / "teacher").resolve()]
        (tmp_path / "disk" / "w").rename(tmp_path / "disk" / "moved")
        fill(tmp_path / "disk")
        assert (store / "store.lock").stat().st_size == 0  # only runs have held it: no holder text yet
        proc = run_cli("gc", "--store", store, "--keep", "0", "--workdir", tmp_path / "disk" / "moved",
                       check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"removing {unused[0]}" in proc.stdout and not unused[0].exists()
        # The moved work dir's new record needed bytes the disk did not have: said, and its entries kept.
        note = " ".join(proc.stdout.split())
        assert f"could not record {tmp_path / 'disk' / 'moved'} in the store's registry" in note
        assert f"on the filesystem of {store / 'workdirs'}" in note and "stay kept" in note
        assert (tmp_path / "disk" / "moved" / "teacher" / "out.txt").exists()
        assert f"recorded {tmp_path / 'disk' / 'moved'} in the store's registry now that gc has freed space" in note
        records = [json.loads(r.read_text()) for r in (store / "workdirs").glob("*.json")]
        assert [r["path"] for r in records] == [str(tmp_path / "disk" / "moved")]
