"""Real processes racing on one work dir, one store entry, and the store itself (gc against runs)."""
import os
import signal
import subprocess
import sys

from pipeline.core import locks
from tests.conftest import ROOT, run_cli


def start(workdir, store, *options):
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.race_worker", str(workdir), str(store), *options],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(workdir, store, *options):
    return subprocess.run([sys.executable, "-m", "tests.pipeline.race_worker", str(workdir), str(store), *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def wait_for(proc, wanted):
    for line in proc.stdout:
        if line.strip() == wanted:
            return
    raise AssertionError(f"worker ended before {wanted!r}: {proc.stderr.read()}")


def wait_started(proc):
    wait_for(proc, "started")


def wait_stopped(proc):
    """Until the worker has stopped itself with SIGSTOP (it said "opening" first)."""
    wait_for(proc, "opening")
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)


def finish(proc, timeout=60):
    out, err = proc.communicate("go\n", timeout=timeout)
    return proc.returncode, out, err


def test_a_second_run_on_a_busy_work_dir_exits_2_and_the_third_is_cached(tmp_path):
    first = start(tmp_path / "w", tmp_path / "store")
    wait_started(first)
    second = worker(tmp_path / "w", tmp_path / "store")
    assert second.returncode == 2
    assert "in use by another run (pid" in second.stderr and str(first.pid) in second.stderr
    assert finish(first)[0] == 0
    third = worker(tmp_path / "w", tmp_path / "store")
    assert third.returncode == 0 and "teacher: cached" in third.stdout


def test_two_work_dirs_racing_for_one_entry_build_it_once(tmp_path):
    first = start(tmp_path / "a", tmp_path / "store")
    wait_started(first)
    second = start(tmp_path / "b", tmp_path / "store")
    # The second blocks on the entry's lock and says so before the first is let go: both hold the store
    # shared at once (many runs share one store).
    assert second.stdout.readline().strip() == "teacher: missing, running"
    assert "waiting for pid" in second.stdout.readline()
    code, out, _ = finish(first)
    assert code == 0 and "teacher: ran in" in out
    code, out, err = finish(second)
    assert code == 0, err
    assert "started" not in out and "built meanwhile by another process" in out
    entries = [p for p in (tmp_path / "store" / "teacher").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "out.txt").read_text() == "built"
    assert (tmp_path / "a" / "teacher").resolve() == (tmp_path / "b" / "teacher").resolve() == entries[0]


def test_gc_cannot_remove_what_a_run_in_a_new_work_dir_has_planned_to_use(tmp_path):
    store = tmp_path / "store"
    assert worker(tmp_path / "old", store, "--hold", "none", "--seed", "0").returncode == 0
    assert worker(tmp_path / "old", store, "--hold", "none", "--seed", "1").returncode == 0
    unused = (tmp_path / "old" / "teacher").resolve()  # the seed-1 entry; the seed-0 one is unreferenced now
    seed0 = [p for p in (store / "teacher").iterdir() if p.is_dir() and p != unused]
    assert len(seed0) == 1
    # A run in a new work dir plans teacher (seed 0) as cached from the store, then stops before linking it.
    run = start(tmp_path / "new", store, "--stages", "teacher,mart", "--seed", "0", "--hold", "open")
    try:
        wait_stopped(run)
        dry = run_cli("gc", "--store", store, "--dry-run", timeout=60)  # needs no lock: answers now
        assert "1 unreferenced entries" in dry.stdout  # by the links alone seed 0 looks unused ...
        gc = run_cli("gc", "--store", store, check=False, timeout=60)
        assert gc.returncode == 2 and "Traceback" not in gc.stderr  # ... but gc does not remove it
        assert "runs are using the store" in gc.stderr and str(tmp_path / "new") in gc.stderr
        assert (seed0[0] / "out.txt").read_text() == "built"
        # A scheduled gc waits instead: it says for whom, and goes on only once the run is over.
        waiting = subprocess.Popen([sys.executable, "-m", "pipeline", "gc", "--store", str(store), "--wait"],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = waiting.stdout.readline()
        assert line.startswith(f"waiting for the runs using the store {store} to finish")
        assert str(tmp_path / "new") in line
        assert waiting.poll() is None and (seed0[0] / "out.txt").exists()
    finally:
        os.kill(run.pid, signal.SIGCONT)
    code, out, err = finish(run)
    assert code == 0, err
    rest, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert "0 unreferenced entries" in rest  # what the run linked is referenced now: nothing went
    assert "teacher: cached" in out and "mart: ran in" in out
    assert (tmp_path / "new" / "teacher").resolve() == seed0[0]
    assert (tmp_path / "new" / "mart" / "out.txt").read_text() == "built then mart"
    gc = run_cli("gc", "--store", store, timeout=60)  # the run is over: nothing it links to goes
    assert "0 unreferenced entries" in gc.stdout
    assert (tmp_path / "new" / "teacher" / "out.txt").exists()


def test_a_run_waits_while_gc_holds_the_store(tmp_path):
    store = tmp_path / "store"
    with locks.exclusive(store / "store.lock"):  # as gc holds it while it removes entries
        run = start(tmp_path / "w", store, "--hold", "none")
        line = run.stdout.readline()
        assert line.startswith(f"waiting for gc (pid {os.getpid()} on host") and str(store) in line
        assert not (tmp_path / "w" / "teacher").exists()
    code, out, err = finish(run)
    assert code == 0, err
    assert "teacher: missing, running" in out and (tmp_path / "w" / "teacher" / "out.txt").exists()


def test_a_run_registers_its_work_dir_before_it_plans(tmp_path):
    store = tmp_path / "store"
    run = start(tmp_path / "w", store, "--stages", "teacher,mart", "--hold", "open")
    try:
        wait_stopped(run)
        ident = (tmp_path / "w" / ".rst-mart-id").read_text().strip()
        record = (store / "workdirs" / f"{ident}.json").read_text()
        assert str(tmp_path / "w") in record
        assert not (tmp_path / "w" / "teacher").exists()  # nothing linked yet, and already registered
    finally:
        os.kill(run.pid, signal.SIGCONT)
    assert finish(run)[0] == 0
