"""The content-addressed stage store: every finished stage lives once, under its fingerprint.

```
<store>/<stage>/<fingerprint>/           a finished entry: the stage's outputs + stage.json (written last)
<store>/<stage>/<fingerprint>.partial/   an entry being built (its resume state belongs to that fingerprint)
<store>/<stage>/<fingerprint>.lock       held while the entry is built, so two processes never build one twice
<store>/workdirs/<hash>                  the work dirs that link into the store (for gc)
<store>/sources/                         derived copies of data sources (an RST pickle converted to .npy)
<workdir>/<stage> -> <store>/<stage>/<fingerprint>    a relative symlink to the entry the config selects
```

A parameter changed and changed back, or a second work dir with the same teacher, finds the entry
already built. Symlinks are used because they are atomic to replace (`os.replace`), resolve on Linux,
macOS, NFS and Lustre alike, and `ls -l` shows which entry a work dir uses.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.fingerprint import hash_file

STORE_ENV = "RST_MART_STORE"
RECORD = "stage.json"
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
    try:
        return json.loads((Path(entry) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def check_outputs(entry: Path, record: dict, *, verify: bool) -> str | None:
    """None when every recorded output is there (and, with `verify`, has its recorded digest);
    otherwise why not. Sizes first: cheap, and what `status` checks."""
    outputs = record.get("outputs", {})
    for name, meta in outputs.items():
        path = entry / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"output {name} missing"
        if size != meta.get("size"):
            return f"output {name} changed size"
    if verify:
        for name, meta in outputs.items():
            if output_digest(entry / name) != meta:
                return f"output {name} changed (checksum)"
    return None


@dataclass
class Store:
    root: Path

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
        """Point `<workdir>/<stage>` at `entry`, atomically, and return the entry. A stage directory from
        before the store moves into it (under its recorded fingerprint) first."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        link = workdir / stage
        if link.is_symlink() and Path(os.readlink(link)) == Path(os.path.relpath(entry, workdir)):
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
        self._register(workdir)
        return entry

    def _adopt_legacy(self, stage: str, directory: Path) -> Path | None:
        """A stage directory from before the store becomes the entry of its recorded fingerprint."""
        record = read_record(directory)
        target = self.entry(stage, record["fingerprint"]) if record and "fingerprint" in record else None
        if target is not None and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(directory), str(target))
            return target
        shutil.rmtree(directory)
        return target

    def _register(self, workdir: Path) -> None:
        absolute = str(Path(workdir).absolute())
        ref = self.root / "workdirs" / hashlib.sha256(absolute.encode()).hexdigest()[:32]
        if not ref.exists():
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(absolute + "\n")

    # -- garbage collection -------------------------------------------------------------------------
    def referenced(self) -> set[Path]:
        """Entries that some registered work dir links to (work dirs that are gone are forgotten)."""
        used: set[Path] = set()
        refs = self.root / "workdirs"
        for ref in sorted(refs.glob("*")) if refs.exists() else ():
            workdir = Path(ref.read_text().strip())
            if not workdir.is_dir():
                ref.unlink()
                continue
            for link in workdir.iterdir():
                if link.is_symlink():
                    used.add(link.resolve())
        return used

    def unreferenced(self) -> list[Path]:
        """Finished entries that no work dir links to (partial directories are resume state: kept)."""
        used = self.referenced()
        found = []
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name not in ("workdirs", "sources")):
            for entry in sorted(stage_dir.iterdir()):
                if entry.is_dir() and not entry.name.endswith(".partial") and entry.resolve() not in used:
                    found.append(entry)
        return found


def entry_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
