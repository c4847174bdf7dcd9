"""The store's registry of work dirs: which work dirs link into the store, and which entries each links to.

```
<workdir>/.rst-mart-id          the work dir's id: 32 hex digits and a newline (uuid4)
<store>/workdirs/<id>.json      {"id": "<id>", "path": "/abs/workdir", "links": {"<stage>": "<fingerprint>"}}
```

gc keeps what a registered work dir links to. The id travels with the work dir (`mv runs/x runs/x-final`
moves it too), so the next `run` there finds its record and updates its path; until then, and for a
work dir that was deleted, the record's `links` say which entries to keep. A copy (`cp -r`) carries
the id too: it is told apart from a move because the original is still at the recorded path with the
same id, and gets a new id of its own. Records from before ids (`workdirs/<hash>` holding a path) are
still read. Records are written atomically by the run holding the work dir's lock (or by gc, holding
the store exclusively; or by `status` and `report`, holding it shared, for a copy no run has used yet),
and read with a size bound that never follows a FIFO or a device. gc reads them strictly: a record it
cannot read might be the only one keeping a live work dir's entries, so it stops (`all(strict=True)`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_write_json, atomic_write_text
from pipeline.core.bounded import NotRegularFile, TooLarge, read_regular
from pipeline.core.errors import UserError

ID_FILE = ".rst-mart-id"
REGISTRY_DIR = "workdirs"
RECORD_LIMIT_BYTES = 1 << 20  # 1 MiB: a record is a few hundred bytes
_ID = re.compile(r"[0-9a-f]{32}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


@dataclass
class Registration:
    id: str  # for a record from before ids: its file name (a hash of the path)
    path: Path
    links: dict[str, str] = field(default_factory=dict)  # stage -> fingerprint, as of the last run
    legacy: bool = False  # a record from before ids: it has no links and no id file to match

    def present(self) -> bool:
        """Is this work dir still at its recorded path (and not replaced by another work dir)?"""
        if self.legacy:
            return self.path.is_dir()
        return read_id(self.path) == self.id


def plain_name(name) -> bool:
    """A file name inside a directory: not empty, no separator, not . or .. (so not absolute either)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def read_id(workdir: Path) -> str | None:
    try:
        text = read_regular(Path(workdir) / ID_FILE, 4096, follow_symlinks=False).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _ID.fullmatch(text) else None


def same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Registry:
    def __init__(self, store_root: Path):
        self.dir = Path(store_root) / REGISTRY_DIR

    def record_path(self, id: str) -> Path:
        return self.dir / f"{id}.json"

    def read(self, id: str) -> Registration | None:
        try:
            return _parse(self.record_path(id))
        except BadRecord:
            return None  # rewritten by the register() that asks

    def all(self, *, strict: bool = False) -> list[Registration]:
        """Every record. A file named as a record that cannot be read as one is skipped, or with `strict`
        a UserError naming it and the fix (what gc needs: it must not delete what that record keeps)."""
        found = []
        for path in sorted(self.dir.iterdir()) if self.dir.is_dir() else ():
            try:
                registration = _parse(path)
            except BadRecord as e:
                if strict:
                    quoted = shlex.quote(str(path))
                    raise UserError(
                        f"the store's registry record {path} cannot be read ({e.why}); it may be all that keeps a "
                        f"live work dir's entries, so gc deletes nothing while it is there. If you know the work "
                        f"dir it belonged to, run `python -m pipeline status --workdir DIR` there: that rewrites "
                        f"the record. If that work dir is gone, move the record away (mv {quoted} "
                        f"{shlex.quote(str(path) + '.broken')}) and rerun gc; nothing was removed.") from None
                continue
            if registration is not None:
                found.append(registration)
        return found

    def register(self, workdir: Path, links: dict[str, str]) -> Registration:
        """Record `workdir` (which exists) and what it links to; returns its registration. A work dir
        whose id is recorded at another path has moved there, unless the original is still there (a copy)."""
        here = Path(workdir).resolve()
        id = read_id(here)
        if id is not None:
            known = self.read(id)
            if known is not None and known.path != here and known.present() and not same_dir(known.path, here):
                id = None  # a copy of a work dir that is still there: it needs its own id
        if id is None:
            id = uuid.uuid4().hex
            target = here / ID_FILE
            if target.is_dir() or (target.exists() and not target.is_file()):
                raise UserError(f"{target} is in the way of the work dir's id file (it is not a regular file); "
                                f"move it away and rerun.")
            atomic_write_text(target, id + "\n")
        registration = Registration(id, here, dict(links))
        atomic_write_json(self.record_path(id), {"id": id, "path": str(here), "links": registration.links})
        legacy = self.dir / _legacy_name(here)
        if legacy.is_file():  # superseded by the record just written
            legacy.unlink()
        return registration

    def forget(self, registration: Registration) -> None:
        path = self.dir / (_legacy_name(registration.path) if registration.legacy else f"{registration.id}.json")
        path.unlink(missing_ok=True)


def _legacy_name(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path).encode()).hexdigest()[:32]


class BadRecord(Exception):
    """A file named as a registry record that is not one; `why` says what is wrong with it."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _parse(path: Path) -> Registration | None:
    """A record; None for anything not named as one (left alone, never deleted); BadRecord for a file
    named as a record that cannot be read as one."""
    name = path.name
    if not (name.endswith(".json") and _ID.fullmatch(name[:-5])) and not _ID.fullmatch(name):
        return None
    try:
        text = read_regular(path, RECORD_LIMIT_BYTES, follow_symlinks=False).decode()
    except NotRegularFile as e:
        raise BadRecord(f"it is {e.kind}, not a regular file") from None
    except TooLarge as e:
        raise BadRecord(f"it holds {e.size} bytes, over the {RECORD_LIMIT_BYTES}-byte limit") from None
    except OSError as e:
        raise BadRecord(e.strerror or str(e)) from None
    except UnicodeDecodeError:
        raise BadRecord("it is not UTF-8 text") from None
    if _ID.fullmatch(name):  # from before ids: the work dir's absolute path on one line
        if not text.strip() or "\0" in text:
            raise BadRecord("it names no work dir")
        return Registration(name, Path(text.strip()), legacy=True)
    try:
        record = json.loads(text)
    except ValueError:
        raise BadRecord("it is not JSON: truncated or overwritten") from None
    if (not isinstance(record, dict) or not isinstance(record.get("path"), str) or "\0" in record["path"]
            or not os.path.isabs(record["path"])):
        raise BadRecord("it is not a work dir record (no absolute \"path\")")
    if record.get("id") != name[:-5]:
        raise BadRecord(f"it records the id {str(record.get('id'))[:40]!r}, not its own name's: it belongs elsewhere")
    links = record.get("links") if isinstance(record.get("links"), dict) else {}
    # Only names that stay inside the store: a record is never a way to point gc elsewhere.
    links = {s: f for s, f in links.items() if plain_name(s) and isinstance(f, str) and _FINGERPRINT.fullmatch(f)}
    return Registration(record["id"], Path(record["path"]), links)
