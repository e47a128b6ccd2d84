"""``gridrunner edit``: the safe way to edit a shard by hand while workers run.

It copies the shard (as committed, after merging any earlier hand save) to a private file, opens that
in ``$VISUAL``, ``$EDITOR`` or ``--command`` and waits for the editor to exit. Then, holding the shard's
lock, it merges the user's version into the shard as it is now: a three-way merge against the version
it opened (:func:`gridrunner.reconcile.merge` with that version as the base).

* A row the user left as it was takes the shard's current state (what workers did meanwhile).
* A row the user changed is applied by the rules of :mod:`gridrunner.reconcile` (reset, a not_run row's
  parameters, appended and deleted rows).
* A conflict, a row the user changed or deleted that a worker also changed meanwhile, is explained.
  A result recorded meanwhile is never lost: a finished row that the user deleted or changed stays.

A user's file that cannot be merged (its header broken) leaves the shard as it was, and the file is
kept for the user to fix, its path in the error.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gridrunner.errors import GridError, ShardError
from gridrunner.journal import append_note
from gridrunner.reconcile import fingerprint, merge, opened_base, parse_user_file
from gridrunner.shardfile import STATUS, shard_name
from gridrunner.store import GridStore


@dataclass
class EditResult:
    shard: str
    changed: bool
    summary: str = ""
    conflicts: list = field(default_factory=list)


def editor_command(command: str | None) -> list[str]:
    text = command or os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not text:
        raise GridError("no editor: set $VISUAL or $EDITOR, or pass --command 'CMD' (the file's path is added)")
    try:
        argv = shlex.split(text)
    except ValueError as err:  # an unclosed quote
        raise GridError(f"the editor command {text!r} cannot be split into words as a shell would ({err}); "
                        f"quote it as you would in a shell") from None
    if not argv:
        raise GridError(f"the editor command {text!r} is empty: name an editor (set $VISUAL or $EDITOR, or pass "
                        f"--command 'CMD')")
    return argv


def edit_shard(grid_dir: Path, index: int, command: str | None = None) -> EditResult:
    store = GridStore(grid_dir)
    path = store.shard_dir / shard_name(index)
    if not path.exists():
        names = ", ".join(str(int(p.stem.split("-")[1])) for p in store.shard_paths()) or "none"
        raise GridError(f"no shard {index} in {store.shard_dir} (shards: {names})")
    argv = editor_command(command)
    with store.transaction(path) as shard:  # merges an earlier hand save first, so the base is committed
        opened_text = shard.render() if shard.dirty else path.read_text(encoding="utf-8")
        p = shard.n_params
        opened = {shard.records[i][p]: list(shard.records[i]) for i in shard.valid()}
    workdir = Path(tempfile.mkdtemp(prefix="gridrunner-edit-"))
    copy = workdir / path.name
    copy.write_text(opened_text, encoding="utf-8")
    try:
        code = subprocess.call([*argv, str(copy)])
    except FileNotFoundError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise GridError(f"editor not found: {argv[0]!r} (set $VISUAL or $EDITOR, or pass --command)") from None
    except OSError as err:  # not executable, a directory: the editor never started
        shutil.rmtree(workdir, ignore_errors=True)
        raise GridError(f"cannot run the editor {argv[0]!r} ({err.strerror or err}); {path.name} is unchanged "
                        f"(set $VISUAL or $EDITOR, or pass --command)") from None
    if code != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise GridError(f"the editor ({' '.join(argv)}) exited with status {code}; {path.name} is unchanged")
    try:
        edited = copy.read_text(encoding="utf-8")
    except FileNotFoundError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise GridError(f"the editor ({' '.join(argv)}) deleted the file it was given; {path.name} is "
                        f"unchanged") from None
    except UnicodeDecodeError as err:  # the user's version is kept for them to fix
        raise GridError(f"{copy}: cannot read the edited file ({err}); {path.name} is unchanged") from None
    if edited == opened_text:
        shutil.rmtree(workdir, ignore_errors=True)
        return EditResult(path.name, False, f"{path.name}: no change")
    result = EditResult(path.name, True)
    try:
        with store.transaction(path) as shard:
            p = shard.n_params
            current = {shard.records[i][p]: list(shard.records[i]) for i in shard.valid()}
            user, errors = parse_user_file(copy, edited, shard.header)
            errors = {i: m for i, m in errors.items()
                      if not (m.startswith("row_id ") and "does not match its parameters" in m and user[i][p] in opened)}
            user_ids = {r[p] for i, r in enumerate(user) if i not in errors}
            for rid, base_cells in opened.items():
                now = current.get(rid)
                if now is None or fingerprint(now) == fingerprint(base_cells):
                    continue
                mine = next((r for i, r in enumerate(user) if i not in errors and r[p] == rid), None)
                if mine is None:
                    if now[p + STATUS] in ("done", "failed"):
                        user.append(list(now))  # deleted by the user, finished meanwhile: the result stays
                        result.conflicts.append(f"row {rid}: you deleted it, but it was {now[p + STATUS]} meanwhile; "
                                                f"kept its result (delete it again to drop it)")
                    elif rid not in user_ids:
                        result.conflicts.append(f"row {rid}: you deleted it while it was claimed ({now[p + STATUS]}); "
                                                f"deleted, its worker's result will be kept aside")
                elif fingerprint(mine) != fingerprint(base_cells):
                    result.conflicts.append(f"row {rid}: you changed it, and meanwhile it became {now[p + STATUS]}")
            records, merged_errors, report = merge(path, user, errors, current, shard.header, opened_base(opened))
            shard.records = records
            shard.errors = merged_errors
            shard.lines = list(range(2, len(records) + 2))
            shard.dirty = True
            result.summary = report.describe(path.name, "was edited")
            for message in report.refused:
                if not any(message.startswith(c.split(":")[0]) for c in result.conflicts):
                    result.conflicts.append(message)
            shard.note = result.summary
    except ShardError as err:
        raise GridError(f"{err}; {path.name} is unchanged and your version is kept in {copy}") from None
    append_note(store.shard_dir, result.summary)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


__all__ = ["EditResult", "edit_shard", "editor_command"]
