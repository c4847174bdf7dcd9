"""gc: which store entries go, which stay, and why (`python -m pipeline gc`).

An entry `<store>/<stage>/<fingerprint>/` is removed only when every one of these holds:
- it is a directory (not a symlink) whose stage.json names it (its stage and its fingerprint);
- no registered work dir links to it now, and no registered work dir that moved or vanished recorded a
  link to it (those are kept until `--forget`);
- it was not used within the grace period (`--keep`, default 14 days, as git keeps unreachable objects):
  used = built, or linked or read by a run, `status` or `report` (Store.last_used). A copy of a work dir
  that no command has seen yet (`cp -r runs/a runs/b`) is unknown to the store; the grace period is what
  keeps its entries until any command in it registers it;
- every output its stage.json records still has its recorded sha256: the bytes are provably the store's.
gc stops, deleting nothing, when a registry record cannot be read (it may be all that keeps a live work
dir's entries) or names a work dir whose links point into another store (the registry of a copied
store, `cp -a`, names the original's work dirs; or the work dir moved to another store): the user says
which, and `--forget` drops such a record.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.store import NOT_STAGES, Store, check_outputs, entry_size, read_record
from pipeline.workdir_registry import Registration

DEFAULT_KEEP = "14d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def parse_keep(text: str) -> float:
    """`--keep`'s seconds: "14d", "12h", "30m", "2w", "90s"; "0" or "now" keeps nothing by age."""
    text = text.strip()
    if text in ("0", "now"):
        return 0.0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise UserError(f"--keep {text!r} is not a duration; give a number and a unit (s, m, h, d or w), e.g. "
                        f"--keep 14d (the default) or --keep 12h, or --keep 0 to keep nothing for its age.")
    return float(match[1]) * _UNITS[match[2]]


@dataclass
class Collection:
    """What gc found: entries to remove, and why the others stay."""
    removable: list[Path] = field(default_factory=list)
    recent: list[tuple[Path, float]] = field(default_factory=list)  # unreferenced, used within the grace period
    # Registered work dirs no longer at their path (moved or deleted), with the entries kept for them.
    missing: list[tuple[Registration, list[Path]]] = field(default_factory=list)
    unknown: list[Registration] = field(default_factory=list)  # missing, registered before links were recorded
    not_ours: list[tuple[Path, str]] = field(default_factory=list)  # left alone, with why


def collect(store: Store, *, forget: tuple[Registration, ...] = (), keep_s: float = 0.0,
            now: float | None = None) -> Collection:
    """What gc removes now (see the module's docstring). `forget`: records to leave out. Partial
    directories (resume state), lock files and `.used` markers are not entries and stay."""
    now = time.time() if now is None else now
    result = Collection()
    used: set[Path] = set()
    root = store.root.resolve()
    forgotten = {r.id for r in forget}
    for registration in store.registry.all(strict=True):
        if registration.id in forgotten:
            continue
        links = store.links(registration.path) if registration.path.is_dir() else {}
        used |= {root / stage / fp for stage, fp in links.items()}  # even if it is another work dir by now
        if registration.present():
            if not links and store.other_stores(registration.path):
                raise _foreign(store, registration)
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
            if entry.name.endswith(".partial") or not (entry.is_dir() or entry.is_symlink()):
                continue  # resume state, lock files, markers
            why = _not_an_entry(entry, stage_dir.name)
            if why is not None:
                result.not_ours.append((entry, why))
            elif entry in used:
                continue
            elif now - store.last_used(entry) < keep_s:
                result.recent.append((entry, store.last_used(entry)))
            else:
                problem = check_outputs(entry, read_record(entry) or {}, verify=True)
                if problem is None:
                    result.removable.append(entry)
                else:
                    result.not_ours.append((entry, f"{problem}: those bytes are not provably rst-mart's"))
    return result


def _not_an_entry(entry: Path, stage: str) -> str | None:
    if entry.is_symlink():
        return "it is a symbolic link, not a directory rst-mart wrote (it is not followed)"
    if ".aside-" in entry.name:
        return "a rebuild set it aside because rst-mart could not prove it wrote it"
    record = read_record(entry)
    if (not _FINGERPRINT.fullmatch(entry.name) or record is None or record.get("stage") != stage
            or record.get("fingerprint") != entry.name):
        return "no stage.json names it, so rst-mart did not write it"
    return None


def _foreign(store: Store, registration: Registration) -> UserError:
    others = ", ".join(sorted(str(s) for s in store.other_stores(registration.path)))
    path = shlex.quote(str(registration.path))
    return UserError(
        f"the store's registry record {store.registry.record_path(registration.id)} names the work dir "
        f"{registration.path}, whose stage links point into another store ({others}), not into this one "
        f"({store.root}). Either this store is a copy (cp -a) whose registry still names the original's work "
        f"dirs, or that work dir now uses the other store; gc deletes nothing until you say which. After a "
        f"copy, first run `python -m pipeline status --workdir DIR` in each copied work dir (that registers "
        f"it here), then in both cases `python -m pipeline gc --store {shlex.quote(str(store.root))} --forget "
        f"{path}`; nothing was removed.")


def registrations_to_forget(store: Store, paths: list[str]) -> tuple[Registration, ...]:
    """The records `--forget PATH` names: a work dir that is gone from PATH, or one that links into
    another store (see _foreign). A work dir still there and linking here is refused: its links already
    say what gc keeps."""
    chosen = []
    registrations = store.registry.all(strict=True)
    for given in paths:
        forms = {Path(os.path.abspath(given)), Path(given).resolve()}
        matches = [r for r in registrations if r.path in forms]
        if not matches:
            known = ", ".join(str(r.path) for r in registrations) or "none"
            raise UserError(f"--forget {given}: no work dir is registered at that path in the store {store.root} "
                            f"(registered: {known}).")
        # Another record of the same path, from a work dir that was there before, can be forgotten.
        gone = [r for r in matches if not r.present() or (not store.links(r.path) and store.other_stores(r.path))]
        if not gone:
            raise UserError(f"--forget {given}: that work dir still exists and links into the store; gc "
                            f"already keeps only what it links to. Delete it (rm -r {shlex.quote(given)}) or the "
                            f"links you no longer need, then run gc; nothing was changed.")
        chosen.extend(gone)
    return tuple(chosen)


def gc(store: Store, *, forget_paths: list[str], keep: str, remove: bool, log=print) -> None:
    """Print what gc keeps and why, and what it removes (with `remove`) or would remove, with sizes."""
    keep_s = parse_keep(keep)
    forget = registrations_to_forget(store, forget_paths)
    found = collect(store, forget=forget, keep_s=keep_s)
    again = f"python -m pipeline gc --store {shlex.quote(str(store.root))}"
    for registration, entries in found.missing:
        path = shlex.quote(str(registration.path))
        log(f"keeping {len(entries)} entries ({_mib(sum(entry_size(e) for e in entries))}) of "
            f"{registration.path}, a registered work dir that is no longer there: if it moved, any command in "
            f"it (`python -m pipeline status --workdir NEWPATH`, or `gc --workdir NEWPATH`) registers its new "
            f"place; if it was deleted, `{again} --forget {path}`")
    for registration in found.unknown:
        log(f"{registration.path} was registered by an older rst-mart, which did not record its links, and is "
            f"no longer there: nothing is removed until `{again} --forget {shlex.quote(str(registration.path))}` "
            f"(or any command in its new place)")
    for path, why in found.not_ours:
        log(f"leaving {path} alone: {why}")
    now = time.time()
    for entry, last in found.recent:
        log(f"keeping {entry} ({_mib(entry_size(entry))}): unreferenced, but used {_ago(now - last)} ago "
            f"({_when(last)}), within --keep {keep}")
    removable = [] if found.unknown else found.removable
    verb = "removing" if remove else "would remove"
    total = 0
    for entry in removable:
        size = entry_size(entry)
        total += size
        log(f"{verb} {entry} ({_mib(size)}): unreferenced, last used {_ago(now - store.last_used(entry))} ago")
    if remove:
        for registration in forget:
            store.registry.forget(registration)
            log(f"forgot {registration.path}")
        for entry in removable:
            shutil.rmtree(entry)
            store.used_marker(entry).unlink(missing_ok=True)
    count = len(found.removable) + len(found.recent)
    log(f"{count} unreferenced entries: {len(found.recent)} kept, used within --keep {keep} "
        f"({_mib(sum(entry_size(e) for e, _ in found.recent))}); {len(removable)} "
        + (f"removed ({_mib(total)})" if remove else f"to remove ({_mib(total)}; dry run: nothing removed)"))


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _ago(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
