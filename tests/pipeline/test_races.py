"""Two processes on one work dir, and two on one store entry: real processes, real OS locks."""
import subprocess
import sys

from tests.conftest import ROOT


def start(workdir, store):
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.race_worker", str(workdir), str(store)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_started(proc):
    for line in proc.stdout:
        if line.strip() == "started":
            return
    raise AssertionError(f"worker ended without starting its stage: {proc.stderr.read()}")


def finish(proc, timeout=60):
    out, err = proc.communicate("go\n", timeout=timeout)
    return proc.returncode, out, err


def test_a_second_run_on_a_busy_work_dir_exits_2_and_the_third_is_cached(tmp_path):
    first = start(tmp_path / "w", tmp_path / "store")
    wait_started(first)
    second = subprocess.run([sys.executable, "-m", "tests.pipeline.race_worker", str(tmp_path / "w"),
                             str(tmp_path / "store")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "in use by another run (pid" in second.stderr and str(first.pid) in second.stderr
    assert finish(first)[0] == 0
    third = subprocess.run([sys.executable, "-m", "tests.pipeline.race_worker", str(tmp_path / "w"),
                            str(tmp_path / "store")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and "teacher: cached" in third.stdout


def test_two_work_dirs_racing_for_one_entry_build_it_once(tmp_path):
    first = start(tmp_path / "a", tmp_path / "store")
    wait_started(first)
    second = start(tmp_path / "b", tmp_path / "store")
    # The second blocks on the entry's lock and says so before the first is let go.
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
