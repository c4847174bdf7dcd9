"""The content-addressed stage store: every finished stage lives once, under its fingerprint.

```
<store>/<stage>/<fingerprint>/           a finished entry: the stage's outputs + stage.json (written last)
<store>/<stage>/<fingerprint>.partial/   an entry being built (its resume state belongs to that fingerprint)
<store>/<stage>/<fingerprint>.lock       held while the entry is built, so two processes never build one twice
<store>/<stage>/<fingerprint>.used       touched whenever a run, status or report links or reads the entry (gc's grace)
<store>/<stage>/<fingerprint>.aside-*    what stood where an entry was rebuilt and could not be proved the store's own
<store>/store.lock                       shared by every run while it runs; exclusive for gc (core/locks.py)
<store>/workdirs/<id>.json               the work dirs that link into the store, and their links (registry.py)
<store>/sources/                         derived copies of data sources (an RST pickle converted to .npy)
<workdir>/<stage> -> <store>/<stage>/<fingerprint>    a relative symlink to the entry the config selects
<workdir>/.rst-mart-id                   the work dir's id in the registry (it moves with the work dir)
```

A parameter changed and changed back, or a second work dir with the same teacher, finds the entry
already built. Symlinks are used because they are atomic to replace (`os.replace`), resolve on Linux,
macOS, NFS and Lustre alike, and `ls -l` shows which entry a work dir uses.

The store deletes only bytes it can prove it wrote: an entry is removed (by gc, or when a rebuild
replaces it) only when its stage.json names it and every output it records still has its recorded
sha256; anything else is moved aside under a new name and named in a message, never deleted, and never
followed when it is a symlink. A directory in a work dir where a stage's link goes is adopted only when
its stage.json proves it a finished stage (every output at its recorded sha256), and where the store
already holds that entry its files are removed only when they equal the entry's (sha256); anything else
is refused and left as it is. A work dir inside the store, or a store inside a work dir's stage path,
is refused before anything moves.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import locks
from pipeline.core.atomic import new_file_mode
from pipeline.core.bounded import file_kind, read_regular
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import hash_file
from pipeline.workdir_registry import Registration, Registry, plain_name

STORE_ENV = "RST_MART_STORE"
RECORD = "stage.json"
RECORD_LIMIT_BYTES = 1 << 20  # 1 MiB: a stage.json is a few KiB
STORE_LOCK = "store.lock"
NOT_STAGES = ("workdirs", "sources")  # the store's own directories beside the stages
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def store_dir(configured: str, workdir: Path) -> Path:
    """`run.store`, else $RST_MART_STORE, else `.store` beside the work dir (runs/.store for runs/demo)."""
    chosen = configured or os.environ.get(STORE_ENV, "")
    return Path(chosen).expanduser() if chosen else Path(workdir).absolute().parent / ".store"


def output_digest(path: Path) -> dict:
    """What stage.json records of an output, and what verification compares: its size and sha256 (above
    pipeline.core.fingerprint.FULL_HASH_LIMIT_BYTES, a digest of its size, mtime and sampled blocks)."""
    st = path.stat()
    return {"size": st.st_size, "sha256": hash_file(path, st)}


def read_record(entry: Path) -> dict | None:
    """The entry's stage.json, or None when it is missing, unreadable, not JSON, over 1 MiB, or not a
    regular file (a FIFO or a symlink to a device would hang the reader)."""
    try:
        record = json.loads(read_regular(Path(entry) / RECORD, RECORD_LIMIT_BYTES, follow_symlinks=False))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_outputs(entry: Path, record: dict, *, verify: bool) -> str | None:
    """None when every recorded output is there as a regular file (and, with `verify`, has its recorded
    digest); otherwise why not. Sizes first: cheap, and what `status` checks. A recorded name that is not a
    path inside the entry (`../../dev/zero`, `/etc/passwd`, `a/../..`) makes the entry stale: nothing outside the
    entry is ever looked at."""
    outputs = record.get("outputs", {})
    if not isinstance(outputs, dict) or not all(isinstance(m, dict) for m in outputs.values()):
        return "stage.json's outputs are malformed"
    for name, meta in outputs.items():
        if not inside_name(name):
            return f"stage.json lists output {name!r}, which is not a file name inside the entry"
        try:
            for depth in range(1, name.count("/") + 1):  # a linked folder could lead out of the entry
                if not stat.S_ISDIR(os.lstat(entry.joinpath(*name.split("/")[:depth])).st_mode):
                    return f"output {name} is not inside the entry's own folders"
            st = os.lstat(entry / name)
        except OSError:
            return f"output {name} missing"
        if not stat.S_ISREG(st.st_mode):
            return f"output {name} is {file_kind(st.st_mode)}, not a regular file"
        if st.st_size != meta.get("size"):
            return f"output {name} changed size"
    if verify:
        for name, meta in outputs.items():
            if output_digest(entry / name) != meta:
                return f"output {name} changed (checksum)"
    return None


def inside_name(name) -> bool:
    """A file's path inside an entry: plain names joined by "/" (a stage's outputs may sit in folders, as a
    diffusers model directory does), never absolute, never "..", never empty."""
    return isinstance(name, str) and all(plain_name(part) for part in name.split("/"))


def proves_entry(directory: Path, stage: str, *, verify: bool = False) -> tuple[dict | None, str | None]:
    """(record, None) when `directory` holds a finished `stage` by its stage.json: the record names the
    stage and a fingerprint, and every output it lists is there at its size (with `verify`, and its
    sha256); (None, why not) otherwise."""
    if directory.is_symlink() or not directory.is_dir():
        return None, "it is not a directory"
    record = read_record(directory)
    if record is None:
        return None, f"it has no readable {RECORD}"
    if record.get("stage") != stage:
        return None, f"its {RECORD} is for stage {record.get('stage')!r}, not {stage!r}"
    if not isinstance(record.get("fingerprint"), str) or not _FINGERPRINT.fullmatch(record["fingerprint"]):
        return None, f"its {RECORD} has no valid fingerprint"
    problem = check_outputs(directory, record, verify=verify)
    if problem is not None:
        return None, problem
    return record, None


def proves_own(entry: Path, stage: str, fp: str) -> str | None:
    """None when `entry` is provably the store's own entry `stage`/`fp` (a directory, not a link, whose
    stage.json names it and whose every recorded output has its recorded sha256); else why not."""
    if os.path.islink(entry):
        return f"it is a symbolic link (to {os.readlink(entry)}), not a directory rst-mart wrote"
    record, problem = proves_entry(entry, stage, verify=True)
    if problem is None and record["fingerprint"] != fp:
        problem = f"its {RECORD} is for fingerprint {record['fingerprint'][:16]}, not {fp[:16]}"
    return problem


def within(path: Path, root: Path) -> bool:
    """Is `path` `root` or below it, by the absolute paths or by the resolved ones (symlinks followed)?"""
    pairs = ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (Path(path).resolve(), Path(root).resolve()))
    return any(p == r or r in p.parents for p, r in pairs)


@dataclass
class Store:
    root: Path

    @property
    def lock_file(self) -> Path:
        return self.root / STORE_LOCK

    @property
    def registry(self) -> Registry:
        return Registry(self.root)

    def entry(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def partial(self, stage: str, fp: str) -> Path:
        return self.root / stage / f"{fp}.partial"

    def lock_path(self, stage: str, fp: str) -> Path:
        return self.root / stage / f"{fp}.lock"

    # -- use: what gc's grace period counts from ----------------------------------------------------
    def holds(self, entry: Path) -> bool:
        """Is `entry` a `<stage>/<fingerprint>` path of this store (by resolved parents, the entry itself
        not followed)?"""
        entry = Path(entry)
        return (_FINGERPRINT.fullmatch(entry.name) is not None and entry.parent.name not in NOT_STAGES
                and os.path.realpath(entry.parent.parent) == os.path.realpath(self.root))

    def used_marker(self, entry: Path) -> Path:
        return Path(entry).with_name(f"{Path(entry).name}.used")

    def mark_used(self, entry: Path) -> None:
        """Touch the entry's `.used` marker: gc keeps an unreferenced entry for its grace period after the
        last run, status or report that linked or read it. Best effort: a read-only store or a full
        disk must not fail the command (touching an existing marker needs no free bytes)."""
        if not self.holds(entry):
            return
        marker = self.used_marker(entry)
        with contextlib.suppress(OSError):
            try:
                os.utime(marker, follow_symlinks=False)
            except FileNotFoundError:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, new_file_mode()))
            except PermissionError:  # another user's marker: a new file in its place (the store is shared)
                tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, new_file_mode()))
                os.replace(tmp, marker)

    def last_used(self, entry: Path) -> float:
        """When the entry was last built, linked or read (seconds since the epoch); 0 when unknown."""
        times = []
        for path in (entry, self.used_marker(entry)):
            with contextlib.suppress(OSError):
                times.append(os.lstat(path).st_mtime)
        return max(times, default=0.0)

    def note_workdir(self, workdir: Path) -> None:
        """What `status` and `report` do to a work dir they read (a run does it too, holding the work dir):
        register it when it links into this store, so that a copy (`cp -r`) gets its own id and record
        and gc keeps what it links to, and mark those entries used. Holding the store shared, as a run
        does, so gc never decides between this record and its own deletions; skipped while gc holds it,
        and best effort on a read-only store or a full disk."""
        links = self.links(workdir)
        for stage, fp in links.items():
            self.mark_used(self.entry(stage, fp))
        if not links:
            return
        with contextlib.suppress(locks.Locked, OSError, UserError):
            with locks.shared(self.lock_file):
                self.register(workdir)

    def check_writable(self) -> None:
        try:
            (self.root / "workdirs").mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"the stage store {self.root} is not writable ({e.strerror}); point run.store (or "
                            f"${STORE_ENV}) at a directory you can write, e.g. --set run.store=$HOME/rst-store.") \
                from None

    # -- what a run checks before it touches anything ----------------------------------------------
    def check_layout(self, workdir: Path, stages) -> None:
        """Refuse a work dir inside the store (or equal to it), and a store inside a work dir's stage path:
        linking would replace the store's own entries, or the store itself, with symlinks."""
        if within(workdir, self.root):
            raise UserError(f"the work dir {workdir} is inside the stage store {self.root} (or is the store); "
                            f"linking its stages would replace the store's entries with links to themselves. "
                            f"Give --workdir a directory outside the store, e.g. runs/demo; nothing was changed.")
        for stage in stages:
            # A link there is replaced, not entered: where it points (even `/`) puts nothing at risk.
            if not (Path(workdir) / stage).is_symlink() and within(self.root, Path(workdir) / stage):
                raise UserError(f"the stage store {self.root} is inside {Path(workdir) / stage}, where the work "
                                f"dir's {stage} link goes; point run.store (or ${STORE_ENV}) elsewhere, e.g. "
                                f"beside the work dir; nothing was changed.")

    def check_adoptable(self, workdir: Path, stage: str) -> None:
        """`<workdir>/<stage>` is absent, a link, or a finished stage from before the store; anything else
        is the user's and is refused (exit 2) rather than moved or deleted."""
        path = Path(workdir) / stage
        if path.is_symlink() or not os.path.lexists(path):
            return
        record, problem = proves_entry(path, stage, verify=True)  # sizes alone miss an edit in place
        target = self.entry(stage, record["fingerprint"]) if record is not None else None
        if target is not None and os.path.lexists(target):
            extra = sorted(set(os.listdir(path)) - set(record.get("outputs", {})) - {RECORD})
            if extra:
                problem = (f"it duplicates the store's entry {target} but also holds "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which rst-mart did not record")
            else:
                problem = self._differs_from(path, record, target)
        if problem is not None:
            move = f"mv {shlex.quote(str(path))} {shlex.quote(str(path) + '.mine')}"
            raise UserError(f"{path} is in the way of the work dir's {stage} link and rst-mart cannot prove it "
                            f"wrote it ({problem}); it is left as it is. Move it elsewhere ({move}) and rerun.")

    @staticmethod
    def _differs_from(directory: Path, record: dict, target: Path) -> str | None:
        """None when every output of `directory` (already verified against its own record) has the sha256
        the store's entry `target` records for it, so removing the copy loses no byte; else why not."""
        if os.path.islink(target) or not os.path.isdir(target):
            return f"the store's entry {target} it duplicates is not a directory rst-mart wrote"
        theirs = read_record(target)
        outputs = theirs.get("outputs") if isinstance(theirs, dict) else None
        if not isinstance(outputs, dict):
            return f"the store's entry {target} it duplicates has no readable {RECORD}"
        for name, meta in record.get("outputs", {}).items():
            if outputs.get(name) != meta:
                return (f"its {name} differs from the one in the store's entry {target} (sha256), so it may hold "
                        f"changes of yours")
        return None

    # -- committing and linking -----------------------------------------------------------------------
    def commit(self, stage: str, fp: str, partial: Path, *, log=print) -> Path:
        """Rename a complete partial directory (stage.json already in it) into place as the entry. What
        stood there (a forced rebuild, an entry whose outputs failed verification, a symlink, a foreign
        directory) is first renamed aside under a name no later run can collide with, then deleted only
        if its bytes are provably the store's own; otherwise it stays aside and `log` names it."""
        entry = self.entry(stage, fp)
        if os.path.lexists(entry):
            aside = entry.with_name(f"{fp}.aside-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
            os.rename(entry, aside)  # renames a symlink itself, never what it points to
            problem = proves_own(aside, stage, fp)
            if problem is None:
                shutil.rmtree(aside)
            else:
                log(f"{stage}: moved {entry} aside to {aside} and left it there: {problem}. rst-mart deletes only "
                    f"what it can prove it wrote; look inside, then delete it yourself if you do not need it.")
        partial.rename(entry)
        return entry

    def link(self, workdir: Path, stage: str, entry: Path) -> Path:
        """Point `<workdir>/<stage>` at `entry`, atomically, record the link in the registry, and return the
        entry. A finished stage directory from before the store moves into it (under its recorded
        fingerprint) first; anything else there is refused."""
        workdir = Path(workdir)
        self.check_layout(workdir, [stage])
        self.check_adoptable(workdir, stage)
        workdir.mkdir(parents=True, exist_ok=True)
        link = workdir / stage
        self.mark_used(entry)
        if link.is_symlink():  # what it linked to until now counts as used now: a copy may still link to it
            self.mark_used(Path(os.path.realpath(link)))
        if link.is_symlink() and Path(os.readlink(link)) == Path(os.path.relpath(entry, workdir)):
            self.register(workdir)
            return entry
        if link.exists() and not link.is_symlink():
            adopted = self._adopt_legacy(stage, link)
            if Path(entry).absolute() == link.absolute():
                entry = adopted
        tmp = workdir / f".{stage}.link.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(entry, workdir), tmp)
        os.replace(tmp, link)
        self.register(workdir)
        return entry

    def _adopt_legacy(self, stage: str, directory: Path) -> Path:
        """A finished stage directory from before the store (check_adoptable has passed) becomes the entry
        of its recorded fingerprint; where that entry exists, only the files its record lists are removed."""
        record, _ = proves_entry(directory, stage)
        target = self.entry(stage, record["fingerprint"])
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(directory), str(target))
            return target
        for name in [*record.get("outputs", {}), RECORD]:
            (directory / name).unlink()
        directory.rmdir()  # fails, deleting nothing more, if anything else appeared meanwhile
        return target

    # -- the work-dir registry ------------------------------------------------------------------------
    def links(self, workdir: Path) -> dict[str, str]:
        """stage -> fingerprint for each of the work dir's links into this store."""
        found = {}
        root = self.root.resolve()
        try:
            names = os.listdir(workdir)
        except OSError:
            return found
        for name in names:
            path = Path(workdir) / name
            if path.is_symlink():
                target = Path(os.path.realpath(path))
                if target.parent == root / name and _FINGERPRINT.fullmatch(target.name):
                    found[name] = target.name
        return found

    def other_stores(self, workdir: Path) -> set[Path]:
        """The other stores the work dir's stage links point into (`<store>/<stage>/<fingerprint>`)."""
        found = set()
        root = self.root.resolve()
        with contextlib.suppress(OSError):
            for name in os.listdir(workdir):
                path = Path(workdir) / name
                if path.is_symlink():
                    target = Path(os.path.realpath(path))
                    if target.parent.name == name and _FINGERPRINT.fullmatch(target.name) \
                            and target.parent.parent != root:
                        found.add(target.parent.parent)
        return found

    def register(self, workdir: Path) -> Registration:
        """Record the work dir (giving it an id file if it has none) and its current links."""
        return self.registry.register(workdir, self.links(workdir))

    def collect(self, **options):
        """What gc would do now: pipeline.store_gc.collect."""
        from pipeline import store_gc

        return store_gc.collect(self, **options)


def entry_size(path: Path) -> int:
    """Bytes in the regular files under `path` (symlinks not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total
