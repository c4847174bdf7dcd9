"""The content-addressed stage store: every finished stage lives once, under its fingerprint.

```
<store>/<stage>/<fingerprint>/           a finished entry: the stage's outputs + stage.json (written last)
<store>/<stage>/<fingerprint>.partial/   an entry being built (its resume state belongs to that fingerprint)
<store>/<stage>/<fingerprint>.lock       held while the entry is built, so two processes never build one twice
<store>/store.lock                       shared by every run while it runs; exclusive for gc (core/locks.py)
<store>/workdirs/<id>.json               the work dirs that link into the store, and their links (registry.py)
<store>/sources/                         derived copies of data sources (an RST pickle converted to .npy)
<workdir>/<stage> -> <store>/<stage>/<fingerprint>    a relative symlink to the entry the config selects
<workdir>/.rst-mart-id                   the work dir's id in the registry (it moves with the work dir)
```

A parameter changed and changed back, or a second work dir with the same teacher, finds the entry
already built. Symlinks are used because they are atomic to replace (`os.replace`), resolve on Linux,
macOS, NFS and Lustre alike, and `ls -l` shows which entry a work dir uses.

The store deletes only what it wrote: an entry is removed (by gc, or replaced by a rebuild) only when
its stage.json names it; a directory in a work dir where a stage's link goes is adopted only when its
stage.json proves it a finished stage, and refused otherwise; a work dir inside the store, or a store
inside a work dir's stage path, is refused before anything moves.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

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
    plain file name (`../../dev/zero`, `/etc/passwd`, `a/b`) makes the entry stale: nothing outside the
    entry is ever looked at."""
    outputs = record.get("outputs", {})
    if not isinstance(outputs, dict) or not all(isinstance(m, dict) for m in outputs.values()):
        return "stage.json's outputs are malformed"
    for name, meta in outputs.items():
        if not plain_name(name):
            return f"stage.json lists output {name!r}, which is not a file name inside the entry"
        try:
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


def proves_entry(directory: Path, stage: str) -> tuple[dict | None, str | None]:
    """(record, None) when `directory` holds a finished `stage` by its stage.json: the record names the
    stage and a fingerprint, and every output it lists is there at its size; (None, why not) otherwise."""
    if directory.is_symlink() or not directory.is_dir():
        return None, "it is not a directory"
    record = read_record(directory)
    if record is None:
        return None, f"it has no readable {RECORD}"
    if record.get("stage") != stage:
        return None, f"its {RECORD} is for stage {record.get('stage')!r}, not {stage!r}"
    if not isinstance(record.get("fingerprint"), str) or not _FINGERPRINT.fullmatch(record["fingerprint"]):
        return None, f"its {RECORD} has no valid fingerprint"
    problem = check_outputs(directory, record, verify=False)
    if problem is not None:
        return None, problem
    return record, None


def within(path: Path, root: Path) -> bool:
    """Is `path` `root` or below it, by the absolute paths or by the resolved ones (symlinks followed)?"""
    pairs = ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (Path(path).resolve(), Path(root).resolve()))
    return any(p == r or r in p.parents for p, r in pairs)


@dataclass
class Collection:
    """What gc found: entries to remove, and why the others stay."""
    removable: list[Path] = field(default_factory=list)
    # Registered work dirs no longer at their path (moved or deleted), with the entries kept for them.
    missing: list[tuple[Registration, list[Path]]] = field(default_factory=list)
    unknown: list[Registration] = field(default_factory=list)  # missing, registered before links were recorded
    not_ours: list[Path] = field(default_factory=list)  # directories without a stage.json naming them: left alone


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
        record, problem = proves_entry(path, stage)
        if record is not None and self.entry(stage, record["fingerprint"]).exists():
            extra = sorted(set(os.listdir(path)) - set(record.get("outputs", {})) - {RECORD})
            if extra:
                problem = (f"it duplicates the store's entry {self.entry(stage, record['fingerprint'])} but also "
                           f"holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which rst-mart did "
                           f"not record")
        if problem is not None:
            raise UserError(f"{path} is in the way of the work dir's {stage} link and rst-mart cannot prove it "
                            f"wrote it ({problem}); it is left as it is. Move it elsewhere (mv {shlex.quote(str(path))} "
                            f"{shlex.quote(str(path) + '.mine')}) and rerun.")

    # -- committing and linking -----------------------------------------------------------------------
    def commit(self, stage: str, fp: str, partial: Path) -> Path:
        """Rename a complete partial directory (stage.json already in it) into place as the entry."""
        entry = self.entry(stage, fp)
        old = entry.with_name(f"{fp}.old")
        if old.exists():
            shutil.rmtree(old)
        if entry.exists():  # a forced rebuild, or an entry whose outputs failed verification
            entry.rename(old)
        partial.rename(entry)
        if old.exists():
            shutil.rmtree(old)
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

    def register(self, workdir: Path) -> Registration:
        """Record the work dir (giving it an id file if it has none) and its current links."""
        return self.registry.register(workdir, self.links(workdir))

    # -- garbage collection -------------------------------------------------------------------------
    def collect(self, *, forget: tuple[Registration, ...] = ()) -> Collection:
        """What gc removes: finished entries (a stage.json names them) that no registered work dir links to,
        where a work dir that has moved or vanished keeps the entries its record lists. `forget`: records
        to leave out. Partial directories (resume state) and lock files stay."""
        result = Collection()
        used: set[Path] = set()
        root = self.root.resolve()
        forgotten = {r.id for r in forget}
        for registration in self.registry.all():
            if registration.id in forgotten:
                continue
            if registration.path.is_dir():  # what it links to now, even if it is another work dir by now
                used |= {root / stage / fp for stage, fp in self.links(registration.path).items()}
            if registration.present():
                continue
            if registration.legacy:
                result.unknown.append(registration)
                continue
            kept = [root / stage / fp for stage, fp in registration.links.items()]
            used |= set(kept)
            result.missing.append((registration, [e for e in kept if e.is_dir()]))
        for stage_dir in sorted(root.iterdir()):
            if stage_dir.name in NOT_STAGES or stage_dir.is_symlink() or not stage_dir.is_dir():
                continue
            for entry in sorted(stage_dir.iterdir()):
                if entry.is_symlink() or not entry.is_dir() or entry.name.endswith((".partial", ".old")):
                    continue
                record = read_record(entry)
                if (not _FINGERPRINT.fullmatch(entry.name) or record is None
                        or record.get("stage") != stage_dir.name or record.get("fingerprint") != entry.name):
                    result.not_ours.append(entry)
                elif entry not in used:
                    result.removable.append(entry)
        return result


def entry_size(path: Path) -> int:
    """Bytes in the regular files under `path` (symlinks not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total
