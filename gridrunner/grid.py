"""A grid directory as a whole: making (and extending) it, finding it, and reading its saved spec."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gridrunner.errors import GridError, SpecError
from gridrunner.expr import Expr
from gridrunner.spec import Spec, expand, load_spec, validate
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
    shard_index,
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

    def lines(self) -> list[str]:
        verb = "would write" if self.dry_run else "wrote"
        out = [f"{self.grid_dir}: {self.total} rows in the spec; {self.kept} already there, "
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
    report = MakeReport(grid_dir, dry_run=dry_run)
    resolved = spec.resolved()
    resolved["project_dir"] = str(Path.cwd().resolve())
    resolved["source"] = str(spec_path.resolve())

    store = GridStore(grid_dir)
    existing: dict = {}
    old_paths = []
    if (grid_dir / SPEC_FILE).exists():
        old = read_resolved(grid_dir)
        check_compatible(old, resolved, spec_path)
        store.recover()
        existing = store.existing_ids()
        old_paths = store.shard_paths()
    elif grid_dir.exists() and any(grid_dir.iterdir()):
        raise GridError(f"{grid_dir} exists but holds no {SPEC_FILE}; it is not a grid. Move it away or "
                        f"choose another name or --runs DIR")

    # Every row first, so every exclude rule and the cost have been evaluated (a SpecError naming the key
    # and the row where one cannot be) before anything is written.
    rows = list(_rows_to_write(spec, existing, report))
    _check_not_empty(spec, spec_path, report)
    header = header_for(spec.params, spec.outcomes)
    first = max((shard_index(p) for p in old_paths), default=-1) + 1
    if dry_run:
        report.shards = [None] * -(-report.new // spec.max_len)
        return report

    source_text = spec_path.read_text(encoding="utf-8")
    resolved["made_at"] = now_iso()
    spec_text = "# Resolved by `gridrunner make`; edit the source spec and re-run make instead.\n" + \
        yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, width=110)
    if not existing and not (grid_dir / SPEC_FILE).exists():
        # A new grid: build it in a staging directory and rename it into place, so a crash leaves nothing.
        grid_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = grid_dir.with_name(f".{grid_dir.name}.making-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / SHARD_DIR).mkdir(parents=True)
        try:
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


def read_resolved(grid_dir: str | Path) -> dict:
    path = Path(grid_dir) / SPEC_FILE
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise GridError(f"{grid_dir} is not a grid directory (no {SPEC_FILE}); run `gridrunner make SPEC` first") from None
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
        raise SpecError(path, None, f"invalid YAML: {problem}; re-run `gridrunner make` on the source spec",
                        mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise SpecError(path, None, "the saved spec is not a mapping; re-run `gridrunner make` on the source spec")
    return data


def saved_spec(grid_dir: str | Path, check_task: bool = False, resolved: dict | None = None) -> Spec:
    """The grid's resolved spec as a :class:`Spec` (no task import unless asked); ``resolved`` is what
    :func:`read_resolved` returned, when the caller has read it already."""
    data = read_resolved(grid_dir) if resolved is None else resolved
    clean = {k: v for k, v in data.items() if k not in ("project_dir", "source", "made_at")}
    return validate(clean, path=Path(grid_dir) / SPEC_FILE, check_task=check_task)


def find_grid(grid: str | Path | None = None, runs_dir: str | Path = DEFAULT_RUNS) -> Path:
    """The grid a command acts on: ``grid`` if given, else the one made most recently under ``runs_dir``."""
    if grid is not None:
        path = Path(grid)
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


def reset_rows(grid_dir: str | Path, statuses=(), rows=(), where: str | None = None, dry_run: bool = False) -> int:
    """Reset the selected rows to ``not_run``; see ``gridrunner reset --help`` for the selection rules."""
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
