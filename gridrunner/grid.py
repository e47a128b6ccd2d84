"""A grid directory as a whole: making (and extending) it, finding it, and reading its saved spec."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gridrunner.errors import GridError, SpecError
from gridrunner.expr import Expr
from gridrunner.journal import JOURNAL_DIR
from gridrunner.spec import BOOK_COLUMNS, Spec, expand, load_spec, validate
from gridrunner.store import (
    ATTEMPTS,
    ROW_ID,
    RUNTIME,
    STATUS,
    SHARD_DIR,
    SOURCE_FILE,
    SPEC_FILE,
    GridStore,
    check_compatible,
    header_for,
    now_iso,
    why_failed,
    write_atomic,
    write_shards,
)

DEFAULT_RUNS = "runs"


@dataclass
class MakeReport:
    grid_dir: Path
    total: int = 0  # rows the spec expands to
    new: int = 0  # rows written now
    kept: int = 0  # rows already there
    orphans: list = field(default_factory=list)  # row ids in the shards that the spec no longer makes
    shards: list = field(default_factory=list)  # shard files written now
    dry_run: bool = False
    restored: str = ""  # how spec.yaml, missing or unreadable, was (or would be) restored
    warnings: list = field(default_factory=list)  # about the spec's text (gridrunner.spec.Spec.warnings)

    def lines(self) -> list[str]:
        verb = "would write" if self.dry_run else "wrote"
        out = [self.restored] if self.restored else []
        out += [f"{self.grid_dir}: {self.total} rows in the spec; {self.kept} already there, "
               f"{verb} {self.new} new in {len(self.shards)} shard file(s)"]
        if self.orphans:
            sample = ", ".join(self.orphans[:5]) + (" ..." if len(self.orphans) > 5 else "")
            out.append(f"{len(self.orphans)} row(s) in the shards are no longer in the spec and were kept: {sample}")
        return out


def make(spec_path: str | Path, runs_dir: str | Path = DEFAULT_RUNS, dry_run: bool = False) -> MakeReport:
    """Expand a spec into ``<runs_dir>/<name>/``, or extend the grid already there.

    Existing rows and their results are never touched; new rows go to new shard files; rows the spec
    no longer makes are reported, not deleted. Everything is validated before anything is written.
    """
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    grid_dir = Path(runs_dir) / spec.name
    report = MakeReport(grid_dir, dry_run=dry_run, warnings=list(spec.warnings))
    resolved = spec.resolved()
    resolved["project_dir"] = str(Path.cwd().resolve())
    resolved["source"] = str(spec_path.resolve())

    store = GridStore(grid_dir)
    existing: dict = {}
    is_grid = (grid_dir / SPEC_FILE).exists() or bool(store.shard_paths() or store.journaled_shards())
    if is_grid:
        try:
            old = read_resolved(grid_dir, hint="")
        except GridError as unreadable:  # missing or unreadable, in a folder that holds rows
            old = _vouched_spec(store, spec, resolved, spec_path, unreadable, report)
        check_compatible(old, resolved, spec_path)
        store.recover()
        _refuse_missing_shards(store, spec_path)
        existing = store.existing_ids()
    elif grid_dir.exists() and any(grid_dir.iterdir()):
        raise GridError(f"{grid_dir} exists but holds no {SPEC_FILE}; it is not a grid. Move it away or "
                        f"choose another name or --runs DIR")

    # Every row first, so every exclude rule and the cost have been evaluated (a SpecError naming the key
    # and the row where one cannot be) before anything is written.
    rows = list(_rows_to_write(spec, existing, report))
    _check_not_empty(spec, spec_path, report)
    header = header_for(spec.params, spec.outcomes)
    first = store.next_index()
    if dry_run:
        report.shards = [None] * -(-report.new // spec.max_len)
        return report

    source_text = spec_path.read_text(encoding="utf-8")
    resolved["made_at"] = now_iso()
    spec_text = "# Resolved by `gridrunner make`; edit the source spec and re-run make instead.\n" + \
        yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, width=110)
    if not is_grid:
        # A new grid: build it in a staging directory and rename it into place, so a crash leaves nothing.
        _make_runs_dir(grid_dir.parent)
        staging = grid_dir.with_name(f".{grid_dir.name}.making-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / SHARD_DIR).mkdir(parents=True)
            report.shards = write_shards(staging / SHARD_DIR, header, rows, spec.max_len, first, fsync=False)
            _check_not_empty(spec, spec_path, report)
            write_atomic(staging / SOURCE_FILE, source_text, fsync=False)
            write_atomic(staging / SPEC_FILE, spec_text, fsync=False)
            os.sync()
            if grid_dir.exists():
                grid_dir.rmdir()  # empty (checked above)
            os.rename(staging, grid_dir)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError):  # a full disk or a quota is the user's to fix, not a bug
                raise GridError(f"cannot write {grid_dir} ({why_failed(err)}); nothing was written") from err
            raise
        report.shards = [grid_dir / SHARD_DIR / p.name for p in report.shards]
    else:
        try:
            (grid_dir / SHARD_DIR).mkdir(exist_ok=True)  # gone with every journal: its rows are new again
            report.shards = write_shards(grid_dir / SHARD_DIR, header, rows, spec.max_len, first, fsync=True)
            _check_not_empty(spec, spec_path, report)  # no rows: write_shards wrote no file
            write_atomic(grid_dir / SOURCE_FILE, source_text)
            write_atomic(grid_dir / SPEC_FILE, spec_text)
        except OSError as err:
            # Each new shard file appears whole or not at all, and existing ones are never touched; running
            # make again adds the rows still missing.
            raise GridError(f"cannot add rows to {grid_dir} ({why_failed(err)}); existing rows are unchanged, and "
                            f"`gridrunner make` again adds the rows still missing") from err
    return report


def _refuse_missing_shards(store: GridStore, spec_path: Path) -> None:
    """Refuse to extend a grid whose shard files are gone but whose journals are there. The journals
    still hold those rows and their results: adding the rows again as new would hide the results
    behind fresh ``not_run`` rows, and a new shard under a deleted one's name would take its journal.
    Only ``gridrunner recover`` writes such shards back."""
    missing = store.missing_shards()
    if not missing:
        return
    journals = store.grid_dir / JOURNAL_DIR
    if not store.shard_dir.is_dir():
        what = f"{store.shard_dir}/ is missing, but the journals of its {len(missing)} shard(s) are in {journals}/"
    else:
        names = ", ".join(p.name for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        what = (f"{names} {'is' if len(missing) == 1 else 'are'} missing from {store.shard_dir}/, but "
                f"{'its journal is' if len(missing) == 1 else 'their journals are'} still in {journals}/")
    raise GridError(f"{what}; run `gridrunner recover --grid {store.grid_dir}` first (it rebuilds shards from their "
                    f"journals, or says why it cannot), then `gridrunner make {spec_path}` again; nothing was written")


def _vouched_spec(store: GridStore, spec: Spec, resolved: dict, spec_path: Path, unreadable: GridError,
                  report: MakeReport) -> dict:
    """``spec.yaml`` is missing or unreadable, but the folder holds shards or journals: the grid's
    results are there, and every other command needs ``spec.yaml``. The spec being made may take its
    place if the grid's own record vouches for it, and then ``make`` goes on as for any re-make (and
    writes ``spec.yaml`` again): ``spec.source.yaml``, which every ``make`` saves beside ``spec.yaml``,
    when it loads (then it is checked as ``spec.yaml`` would be); else the shards' columns, when they
    are exactly the spec's parameters and outcomes. Returns what ``resolved`` is then checked against."""
    grid_dir = store.grid_dir
    spec_file, source = grid_dir / SPEC_FILE, grid_dir / SOURCE_FILE
    lost = f"{spec_file} is missing" if not spec_file.exists() else str(unreadable)
    verb = "would restore" if report.dry_run else "restored"
    try:
        saved = load_spec(source, check_task=False).resolved()
    except GridError as err:
        source_why = str(err)
    else:
        report.restored = f"{lost}; {verb} it from {spec_path}, which {source} vouches for"
        return saved
    expected = header_for(spec.params, spec.outcomes)
    headers = _shard_headers(store)
    if headers and all(h == expected for h in headers):
        report.restored = (f"{lost}; {verb} it from {spec_path}, whose parameters and outcomes are the shards' "
                           f"columns ({source_why}; the task and the fixed values cannot be checked)")
        return resolved
    columns = "no shard or journal can be read" if not headers else (
        f"the shards' parameters and outcomes are {_columns(next(h for h in headers if h != expected))}, "
        f"not the spec's {_columns(expected)}")
    raise GridError(f"{lost}, and nothing in {grid_dir} vouches for {spec_path}: {source_why}; {columns}. "
                    f"Restore {spec_file} from a backup, or make {spec_path} as a new grid (another `name:` or "
                    f"--runs DIR); nothing was written")


def _shard_headers(store: GridStore) -> list[list[str]]:
    """The header of every shard file and every journal that can be read."""
    headers = []
    for path in store.shard_paths():
        try:
            headers.append(store.read(path).header)
        except GridError:
            pass
    for path in store.journaled_shards():
        try:
            state = store.journal(path).read_state()
        except OSError:
            state = None
        if state is not None:
            headers.append(state.header)
    return headers


def _columns(header: list[str]) -> str:
    """A shard header's parameter and outcome columns, as ``a, b; value`` (the bookkeeping left out)."""
    p = header.index("row_id") if "row_id" in header else len(header)
    return f"{', '.join(header[:p])}; {', '.join(header[p + len(BOOK_COLUMNS):])}"


def _make_runs_dir(runs_dir: Path) -> None:
    """Create ``runs_dir`` (``--runs``) where it is missing; a GridError that names it and why where it cannot
    be created (a read-only parent, a file in its way, no such filesystem)."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        place = next((p for p in [runs_dir, *runs_dir.parents] if os.path.lexists(p)), None)
        if place is not None and not place.is_dir():
            why = f"{place} is not a directory"
        else:
            why = why_failed(err)
        raise GridError(f"cannot create the runs directory {runs_dir} ({why}); nothing was written; choose "
                        f"another --runs DIR") from None


def _check_not_empty(spec: Spec, spec_path: Path, report: MakeReport) -> None:
    """A spec whose ``exclude`` drops every row is a mistake; call it once the rows were counted."""
    if report.total == 0:
        raise SpecError(spec_path, "exclude", f"every one of the grid's {spec.size()} rows is excluded; the grid "
                                              f"would be empty")


def _rows_to_write(spec: Spec, existing: dict, report: MakeReport):
    """Generator of (cells, row_id) for new rows, cost-ordered when the spec has a cost; counts as it goes."""
    seen = set() if existing else None

    def fresh():
        for row in expand(spec):
            report.total += 1
            if row.row_id in existing:
                report.kept += 1
                seen.add(row.row_id)
                continue
            report.new += 1
            yield row

    def finish_orphans():
        if existing:
            report.orphans = sorted(set(existing) - seen)

    cost = spec.cost_expr()
    if cost is None:
        for row in fresh():
            yield row.cells, row.row_id
        finish_orphans()
        return
    # Expensive rows first, dealt round-robin so every shard starts with its most expensive rows:
    # workers claim in file order, so the grid runs longest-first (good for the makespan).
    ranked = []
    for row in fresh():
        value = spec.cost_of(cost, row.params)
        ranked.append((-(value if isinstance(value, (int, float)) else 0.0), len(ranked), row))
    finish_orphans()
    ranked.sort(key=lambda item: (item[0], item[1]))
    n_shards = max(1, -(-len(ranked) // spec.max_len))
    for k in range(n_shards):
        for _, _, row in ranked[k::n_shards]:
            yield row.cells, row.row_id


FAST_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


_REMAKE_HINT = "; re-run `gridrunner make` on the source spec to restore it"


def read_resolved(grid_dir: str | Path, hint: str = _REMAKE_HINT) -> dict:
    """The grid's ``spec.yaml`` as a mapping; ``hint``, what a :class:`SpecError` for an unreadable one
    ends with, tells the user how to restore it (``make`` does, from the spec that made the grid)."""
    path = Path(grid_dir) / SPEC_FILE
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise GridError(f"{grid_dir} is not a grid directory (no {SPEC_FILE}); run `gridrunner make SPEC` first") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = why_failed(err) if isinstance(err, OSError) else f"not UTF-8 text ({err.reason} at byte {err.start})"
        raise SpecError(path, None, f"cannot read the saved spec: {reason}{hint}") from None
    try:
        # libyaml's safe loader where PyYAML has it (every worker reads this file as it starts); when the
        # file does not parse, the pure one's, whose messages are the ones documented.
        try:
            data = yaml.load(text, Loader=FAST_SAFE_LOADER)
        except yaml.YAMLError:
            data = yaml.safe_load(text)
    except yaml.YAMLError as err:  # a hand edit; safe loaders never run code, whatever the tags say
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(path, None, f"invalid YAML: {problem}{hint}", mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise SpecError(path, None, f"the saved spec is not a mapping{hint}")
    return data


def saved_spec(grid_dir: str | Path, check_task: bool = False, resolved: dict | None = None) -> Spec:
    """The grid's resolved spec as a :class:`Spec` (no task import unless asked); ``resolved`` is what
    :func:`read_resolved` returned, when the caller has read it already."""
    data = read_resolved(grid_dir) if resolved is None else resolved
    clean = {k: v for k, v in data.items() if k not in ("project_dir", "source", "made_at")}
    return validate(clean, path=Path(grid_dir) / SPEC_FILE, check_task=check_task)


def find_grid(grid: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS, journals_ok: bool = False) -> Path:
    """The grid a command acts on: ``grid`` if given, else the one made most recently under ``runs_dir``.
    With ``journals_ok`` (``recover``), a ``grid`` given without ``spec.yaml`` will do if it holds journals."""
    if grid is not None:
        path = Path(grid)
        if journals_ok and GridStore(path).journaled_shards():
            return path
        if not (path / SPEC_FILE).exists():
            if path.is_file() and path.suffix in (".yaml", ".yml"):
                raise GridError(f"{path} is a spec file, not a grid directory; run `gridrunner make {path}` "
                                f"and pass --grid {Path(runs_dir) / path.stem}")
            raise GridError(f"{path} is not a grid directory (no {SPEC_FILE}); run `gridrunner make SPEC` first")
        return path
    runs = Path(runs_dir)
    candidates = [p.parent for p in runs.glob(f"*/{SPEC_FILE}")] if runs.is_dir() else []
    if not candidates:
        raise GridError(f"no grid under {runs}/; run `gridrunner make SPEC` first, or pass --grid PATH")
    return max(candidates, key=lambda p: (p / SPEC_FILE).stat().st_mtime)


def reset_rows(grid_dir: str | Path, statuses=(), rows=(), where: str | None = None, dry_run: bool = False,
               passed_over: dict | None = None) -> int:
    """Reset the selected rows to ``not_run``; see ``gridrunner reset --help`` for the selection rules.
    ``passed_over``, if given, is filled with the rows named by id that were left as they are because of
    their status (row id → status), so the caller can say which ``--status`` would take them."""
    spec = saved_spec(grid_dir)
    rule = None
    if where is not None:
        rule = Expr(where)
        rule.check_names(spec.params + spec.outcomes + ["status", "attempts", "runtime_s"], "column")
        rule.check_condition("status == 'failed' and loss == 'ssim'")
    if statuses:
        allowed = set(statuses)
    else:
        allowed = {"done", "failed"} if (rows or where) else {"failed"}
    wanted = set(rows)

    def select(shard, i) -> bool:
        fields = shard.records[i]
        p = shard.n_params
        row_id = fields[p + ROW_ID]
        if wanted and row_id not in wanted:
            return False
        status = fields[p + STATUS]
        if status not in allowed:
            if wanted and passed_over is not None:
                passed_over[row_id] = status
            return False
        if rule is not None:
            values = {**shard.row_params(i), **shard.row_outcomes(i), "status": status,
                      "attempts": int(fields[p + ATTEMPTS] or 0)}
            if fields[p + RUNTIME]:
                values["runtime_s"] = float(fields[p + RUNTIME])
            return bool(rule.evaluate(values))
        return True

    store = GridStore(grid_dir)
    if wanted:
        # check every id first, so a typo changes nothing
        known = set(store.existing_ids())
        unknown = sorted(wanted - known)
        if unknown:
            raise GridError(f"no row {unknown[0]!r} in {grid_dir} ({len(unknown)} unknown id(s))")
    return store.reset(select, dry_run=dry_run)
