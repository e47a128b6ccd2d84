"""The ``gridrunner`` command: parses arguments and calls the library, nothing else.

A user's mistake (:class:`gridrunner.GridError`) prints one ``Error: ...`` line and exits 1; click's
usage errors exit 2; anything else is a bug: its traceback is saved to a log file whose path is
printed, and the exit code is 3. A reader that closed its end of stdout's pipe (``| head -1``) ends
the command silently with 141, as a shell reports a tool that SIGPIPE killed. SIGPIPE itself stays
ignored, as Python sets it: a worker must never die in the middle of a shard transaction.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from gridrunner.errors import GridError

RUNS_HELP = "Parent directory of grid directories."
GRID_HELP = "Grid directory to act on (default: the grid made most recently under --runs)."
#: The exit status of a command whose stdout's reader went away: 128 + SIGPIPE, what a shell reports.
CLOSED_PIPE_EXIT = 141


class _Group(click.Group):
    """Turns GridError into a one-line error and an unexpected exception into a saved traceback."""

    def make_context(self, info_name, args, parent=None, **extra):
        _STD_FILES.update({fd: _identity(fd) for fd in (1, 2)})
        with _exit_on_closed_pipe():  # `gridrunner --help | head -1`: the group's own help is written here
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        try:
            with _exit_on_closed_pipe():
                result = super().invoke(ctx)
                sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at the interpreter's exit
            return result
        except GridError as err:
            raise click.ClickException(str(err)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # a bug in gridrunner: keep the evidence
            path = _save_crash_log()
            click.echo(f"Error: unexpected {type(err).__name__}: {err}. This is a bug in gridrunner; "
                       f"the traceback is in {path}", err=True)
            ctx.exit(3)


@contextlib.contextmanager
def _exit_on_closed_pipe():
    """Ends the command with :data:`CLOSED_PIPE_EXIT`, silently, when stdout's (or stderr's) reader has gone.

    The BrokenPipeError may come wrapped: rich's console turns it into ``SystemExit(1)`` raised while
    handling it. Only a pipe of stdout or stderr whose reader is gone counts: a broken pipe of gridrunner's
    own (the worker's spawner) stays a bug. The closed stream is pointed at /dev/null, so the interpreter's
    last flush of what is still buffered does not fail again."""
    try:
        yield
    except BaseException as err:
        closed = _closed_std_pipes() if _from_closed_pipe(err) else []
        if not closed:
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in closed:
            os.dup2(devnull, fd)
        os.close(devnull)
        raise click.exceptions.Exit(CLOSED_PIPE_EXIT) from None


def _from_closed_pipe(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised while handling, a write to a pipe whose reader closed it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno == errno.EPIPE:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


#: What file descriptors 1 and 2 were when the command started: (device, inode), or None where closed.
_STD_FILES: dict[int, tuple | None] = {}


def _identity(file: int | str) -> tuple | None:
    """(device, inode) of an open file descriptor or a path; None if there is none."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _closed_std_pipes() -> list[int]:
    """stdout's and stderr's file descriptors (1, 2) that are pipes whose reader has gone: poll says POLLERR,
    or rich's console already pointed the descriptor at /dev/null after its write failed (it was something
    else when the command started)."""
    devnull = _identity(os.devnull)
    closed = []
    for fd in (1, 2):
        now = _identity(fd)
        if now is None:
            continue
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            closed.append(fd)
        elif now == devnull and _STD_FILES.get(fd, devnull) != devnull:
            closed.append(fd)
    return closed


def _save_crash_log() -> str:
    directory = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gridrunner"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir())
    path = directory / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"gridrunner {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}", encoding="utf-8")
    return str(path)


class _Finite(click.FloatRange):
    """click's FloatRange from ``low``, that also refuses nan, inf and anything above ``high`` (default
    :data:`gridrunner.spec.MAX_DURATION_S`): FloatRange lets nan through (it compares false with every bound),
    and a sleep, a lease or a deadline of nan or inf overflows, or never comes, far from the option that set it."""

    def __init__(self, low: float, unit: str, high: float | None = None):
        super().__init__(min=low)
        self.unit = unit
        self.high = high

    def convert(self, value, param, ctx):
        from gridrunner.spec import MAX_DURATION_S

        number = super().convert(value, param, ctx)
        high = MAX_DURATION_S if self.high is None else self.high
        if not number <= high:  # false for nan as well
            self.fail(f"{value} is not a finite number of {self.unit} up to {high:g}.", param, ctx)
        return number


class _OptionalValueCommand(click.Command):
    """``--watch -1`` is reported as a bad value of --watch. click gives an option with an optional value the
    next word only when that does not look like an option (even as ``--watch=-1``), and would report -1 as an
    unknown option; a negative number after such an option is checked by the option's type instead."""

    def parse_args(self, ctx, args):
        from gridrunner.shardfile import is_number

        for param in self.params:
            if not getattr(param, "_flag_needs_value", False):
                continue
            for word, value in zip(args, args[1:] + [None]):
                if word == "--":
                    break
                if "=" in word and word.split("=", 1)[0] in param.opts:
                    value = word.split("=", 1)[1]
                elif word not in param.opts:
                    continue
                if value is not None and value.startswith("-") and is_number(value):
                    param.type.convert(value, param, ctx)  # raises a usage error that names the option
        return super().parse_args(ctx, args)


def _grid_options(func):
    func = click.option("--runs", "runs_dir", default="runs", show_default=True, help=RUNS_HELP,
                        type=click.Path(file_okay=False))(func)
    func = click.option("--grid", "grid", default=None, help=GRID_HELP, type=click.Path())(func)
    return func


def _find(grid, runs_dir) -> Path:
    from gridrunner.grid import find_grid

    return find_grid(grid, runs_dir)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gridrunner")
def main():
    """Run hyperparameter grids from plain CSV shards, on Slurm or locally, then analyse them.

    \b
      gridrunner make grids/demo.yaml   expand a spec into runs/demo/shards/*.csv
      gridrunner work                   run rows here until none are left
      gridrunner submit --shards 8      run 8 workers as a Slurm job array (or local processes)
      gridrunner status                 progress, failures, stale claims, jobs
      gridrunner analyze                regressions on outcome and failure, plots, report

    Commands act on the grid made most recently under ./runs unless --grid says otherwise.
    Kill any worker at any time and start it again: nothing is lost and nothing runs twice.
    """
    if os.getcwd() not in sys.path:  # users' own task modules live beside their specs, as with `python -m`
        sys.path.insert(1, os.getcwd())


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--runs", "runs_dir", default="runs", show_default=True, help=RUNS_HELP, type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Validate and count the rows; write nothing.")
def make(spec, runs_dir, dry_run):
    """Expand SPEC (a YAML grid spec) into shard CSV files under RUNS/<name>/.

    Running it again on the same grid keeps every existing row and its results and adds the rows
    that are new (add values to extend a grid). Rows the spec no longer makes are reported, never
    deleted. A bad spec writes nothing.
    """
    from gridrunner.grid import make as make_grid

    report = make_grid(spec, runs_dir, dry_run=dry_run)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    for line in report.lines():
        click.echo(line)


@main.command()
@_grid_options
@click.option("--shard", type=click.IntRange(min=0), default=None,
              help="Start on this shard, then help the others (default: the first). A number past the last "
                   "shard wraps around (N mod the shard count), as Slurm array task N does.")
@click.option("--steal/--no-steal", default=True, show_default=True,
              help="After the home shard, claim rows from the other shards.")
@click.option("--lease", "lease_s", type=_Finite(0.1, "seconds"), default=None,
              help="Seconds without a heartbeat before a running row counts as abandoned (default: the spec's lease_s).")
@click.option("--inline", is_flag=True,
              help="Run tasks inside this process (debugging) instead of a fresh child process per row.")
@click.option("--linger/--no-linger", default=True, show_default=True,
              help="When nothing is claimable, wait while other workers still run rows, to take over if they die "
                   "(in Slurm array tasks workers exit instead while the grid's watcher is on duty).")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Stop after this many rows.")
@click.option("--grace", "grace_s", type=_Finite(0, "seconds"), default=60.0, show_default=True,
              help="Seconds a stopping row gets to checkpoint before it is killed.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and the final summary.")
def work(grid, runs_dir, shard, steal, lease_s, inline, linger, max_rows, grace_s, quiet):
    """Claim and run rows in the foreground until none are left.

    Each row runs in a fresh child process; an exception, a crash or a non-finite metric marks the
    row failed with its reason and the worker goes on. Ctrl-C or SIGTERM asks the running row to
    checkpoint and puts it back to not_run.
    """
    from gridrunner.worker import Worker

    _setup_logging(quiet)
    grid_dir = _find(grid, runs_dir)
    worker = Worker(grid_dir, shard=shard, steal=steal, lease_s=lease_s, inline=inline, linger=linger,
                    max_rows=max_rows, grace_s=grace_s, dead_jobs=_scheduler_dead_jobs(grid_dir))
    summary = worker.run()
    click.echo(summary.line(), err=True)
    if summary.error:
        raise click.ClickException(summary.error)


def _scheduler_dead_jobs(grid_dir):
    """The grid's ended Slurm jobs, as ``SchedulerView.dead_jobs``, importing submission (and submitit) at the
    first question: a worker that never asks (no Slurm job holds a row) starts faster without them."""
    view = []

    def dead_jobs():
        if not view:
            from gridrunner.submit import SchedulerView

            view.append(SchedulerView(grid_dir))
        return view[0].dead_jobs()

    return dead_jobs


@main.command(cls=_OptionalValueCommand)
@_grid_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead (its schema is in the README).")
@click.option("--watch", "watch_s", type=_Finite(0.1, "seconds"), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Look again every SECONDS (default 2) until the grid is finished; "
                                        "Ctrl-C stops. With --json: one document per line.")
def status(grid, runs_dir, as_json, watch_s):
    """Progress per shard, counts by status, running rows with age and worker, stale claims and an ETA."""
    from gridrunner.status import current_status, make_console, render, to_json, watch
    from gridrunner.store import GridStore

    grid_dir = _find(grid, runs_dir)
    console = make_console()
    if watch_s is not None:
        try:
            store = GridStore(grid_dir)  # kept across looks: a hand save not merged yet is merged once
            watch(lambda: current_status(grid_dir, store), console, watch_s, as_json=as_json)
        except KeyboardInterrupt:  # the usual way to stop watching, not an error
            pass
        return
    status = current_status(grid_dir)
    if as_json:
        click.echo(json.dumps(to_json(status), indent=2))
    else:
        render(status, console)


@main.command()
@_grid_options
@click.option("--status", "statuses", multiple=True, type=click.Choice(["failed", "done", "running", "not_run"]),
              help="Reset rows with this status (repeatable). Default: failed, or any but running with --row/--where.")
@click.option("--row", "rows", multiple=True, help="Reset this row id (repeatable).")
@click.option("--where", default=None, help="Reset rows matching a rule over parameters and outcomes, e.g. 'loss == \"ssim\"'.")
@click.option("--dry-run", is_flag=True, help="Count the rows that would be reset; change nothing.")
def reset(grid, runs_dir, statuses, rows, where, dry_run):
    """Make rows runnable again (status not_run, attempts 0, results cleared).

    Checkpoints in rows/<id>/checkpoint are kept. Running rows are only reset when --status running
    is given: their worker's result will then be set aside, not written.
    """
    from gridrunner.grid import reset_rows

    passed_over: dict = {}
    n = reset_rows(_find(grid, runs_dir), statuses=statuses, rows=rows, where=where, dry_run=dry_run,
                   passed_over=passed_over)
    note = ""
    if passed_over:
        by_status = sorted(set(passed_over.values()))
        note = (f"; left {len(passed_over)} row(s) given by --row as they are, for their status "
                f"({', '.join(by_status)}): add {' '.join(f'--status {s}' for s in by_status)} to reset them")
    click.echo(f"{'would reset' if dry_run else 'reset'} {n} row(s){note}")


@main.command()
@_grid_options
@click.option("--shard", default=0, show_default=True, type=click.IntRange(min=0), help="The shard to edit.")
@click.option("--command", "command", default=None, help="The editor command (default: $VISUAL, then $EDITOR); "
                                                        "the file's path is added at the end.")
def edit(grid, runs_dir, shard, command):
    """Edit a shard in your editor, safely while workers run: on save, your changes are merged under the lock."""
    from gridrunner.edit import edit_shard

    result = edit_shard(_find(grid, runs_dir), shard, command)
    click.echo(result.summary)
    for conflict in result.conflicts:
        click.echo(f"  {conflict}")


@main.command()
@_grid_options
def recover(grid, runs_dir):
    """Rebuild shards that were deleted, truncated or garbled, from their journals; say what was rebuilt.

    Also rebuilds a deleted shards/ folder. A shard that cannot be rebuilt (its journal is gone or
    unreadable) is named with the reason, and the command exits 1 once it rebuilt all the others.
    """
    from gridrunner.grid import find_grid
    from gridrunner.recovery import lost_summary, recover_grid

    grid_dir = find_grid(grid, runs_dir, journals_ok=True)  # spec.yaml may be lost too: `make` restores it
    report = recover_grid(grid_dir)
    for rebuilt in report:
        click.echo(rebuilt.line())
    lost = lost_summary(grid_dir, report)
    if lost:
        raise GridError(lost)


@main.command()
@_grid_options
@click.option("--shard", required=True, type=click.IntRange(min=0), help="The shard to split.")
@click.option("--into", required=True, type=click.IntRange(min=2), help="How many files to split it into.")
def split(grid, runs_dir, shard, into):
    """Split a slow shard into several files, so more workers can start on it. Running rows stay put."""
    from gridrunner.store import GridStore

    paths = GridStore(_find(grid, runs_dir)).split(shard, into)
    click.echo("split into " + ", ".join(p.name for p in paths))


@main.command()
@_grid_options
@click.option("--shards", "n", type=int, default=None,
              help="Number of workers (Slurm array tasks); worker i starts on shard i mod the shard count. "
                   "Default: one per shard file.")
@click.option("--profile", default="default", show_default=True,
              help="Executor profile: jobs/<PROFILE>.yaml, or a path to a YAML file.")
@click.option("--executor", type=click.Choice(["auto", "slurm", "local"]), default=None,
              help="Where to run (default: the profile's, else auto: Slurm if sbatch is on the PATH).")
@click.option("--partition", default=None, help="Slurm partition (overrides profile and spec).")
@click.option("--time", "time_min", type=click.IntRange(min=1), default=None, help="Time limit per task, minutes.")
@click.option("--gpus", type=click.IntRange(min=0), default=None, help="GPUs per task.")
@click.option("--cpus", type=click.IntRange(min=1), default=None, help="CPUs per task.")
@click.option("--mem", "mem_gb", type=_Finite(0.1, "GB", high=1e6), default=None, help="Memory per task, GB.")
@click.option("--account", default=None, help="Slurm account.")
@click.option("--max-requeues", type=click.IntRange(min=0), default=None,
              help="Requeues per task after a time limit or preemption (default 3).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="Local executor: at most this many workers at once (default: the CPU count).")
@click.option("--rows-per-gpu", type=click.IntRange(min=1), default=None,
              help="Run this many workers on each GPU of a task (GPUs x this many per task; --cpus is then per worker).")
@click.option("--wait", "wait_", is_flag=True, help="Block with a live progress bar until the work is done.")
def submit(grid, runs_dir, n, profile, executor, partition, time_min, gpus, cpus, mem_gb, account, max_requeues,
           max_parallel, rows_per_gpu, wait_):
    """Run workers as one Slurm job array, or as local processes where there is no Slurm.

    Settings come from the profile, overridden by the spec's resources, overridden by these flags.
    Workers checkpoint and requeue on a time limit or preemption. After `scancel` or a dead node,
    submit again: rows of dead jobs are reclaimed at once, others after the heartbeat lease.
    """
    from gridrunner import submit as submission

    if n is not None and n < 1:
        raise click.BadParameter(f"must be at least 1, got {n}", param_hint="'--shards'")
    grid_dir = _find(grid, runs_dir)
    flags = {"partition": partition, "time_min": time_min, "gpus": gpus, "cpus": cpus, "mem_gb": mem_gb,
             "account": account, "max_requeues": max_requeues, "max_parallel": max_parallel,
             "rows_per_gpu": rows_per_gpu}
    result = submission.submit(grid_dir, n, profile=profile, executor=executor, flags=flags)
    for line in result.lines():
        click.echo(line)
    if wait_:
        _wait_with_progress(grid_dir, submission)


def _wait_with_progress(grid_dir, submission) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task(grid_dir.name, total=None, detail="")

        def show(status):
            counts = status.counts
            progress.update(task, total=status.total, completed=counts["done"] + counts["failed"],
                            detail=f"{counts['failed']} failed, {counts['running']} running")

        try:
            submission.wait(grid_dir, on_progress=show)
        except KeyboardInterrupt:  # Ctrl-C stops the waiting, not the workers: they run detached
            progress.stop()
            click.echo(f"stopped waiting; the workers go on (`gridrunner status` shows them, "
                       f"`gridrunner cancel` stops them)", err=True)
            raise SystemExit(130) from None
    from gridrunner.status import grid_status, make_console, render

    render(grid_status(grid_dir), make_console())


@main.command()
@_grid_options
def cancel(grid, runs_dir):
    """Cancel this grid's jobs (Slurm arrays, or the local workers). Their running rows are reclaimed later."""
    from gridrunner.submit import cancel as cancel_jobs

    done = cancel_jobs(_find(grid, runs_dir))
    click.echo("cancelled " + (", ".join(done) if done else "nothing: no job of this grid is running"))


@main.command("replay-prune")
@_grid_options
@click.argument("rules", nargs=-1, required=True)
def replay_prune(grid, runs_dir, rules):
    """Replay prune RULES on every finished row's learning curve; report what they would prune.

    \b
      gridrunner replay-prune 'step >= 200 and val_ssim < 0.3'

    Says how many rows the rules would prune and at which steps, the compute they would save in
    row-seconds (from each pruned row's logged times: the record a rule fires on to the row's end),
    and the false prunes: rows they prune that finished done, by id. Changes nothing.
    """
    from gridrunner.prune import replay

    for line in replay(_find(grid, runs_dir), list(rules)).lines():
        click.echo(line)


@main.command()
@_grid_options
@click.option("--metric", default=None, help="Outcome to model (default: the spec's first outcome).")
@click.option("--failure", default=None,
              help="Failure rule over outcomes and parameters, e.g. 'm_ssim < 0.5 or m_mae > 1' (default: the spec's).")
@click.option("--formula", default=None,
              help="Your own outcome model, e.g. 'm_ssim ~ C(loss) * C(skip) + np.log2(filters) + depth'.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Rows in the top-k table.")
@click.option("--goal", type=click.Choice(["max", "min"]), default=None,
              help="Whether a larger metric is better (default: guessed from its name: loss/error/mae/mse → min).")
@click.option("--split-by", default=None, help="Parameter that splits the metric histogram.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the report (default: <grid>/report).")
def analyze(grid, runs_dir, metric, failure, formula, top, goal, split_by, out_dir):
    """Regress the hyperparameters on the outcome and on failure; write plots, tables and a report.

    Works on a finished grid or one still running (only finished rows enter the models). Writes
    <grid>/report/index.html, report.md and a CSV per table, and prints a one-screen summary.
    Where neither the outcome nor the failure model can be fitted, it says why and writes nothing.
    """
    from gridrunner.frame import load

    grid_dir = _find(grid, runs_dir)
    try:
        from gridrunner.analysis.report import build_report
    except ImportError as err:
        raise GridError(f"the analysis needs its extra: pip install 'gridrunner[analysis]' ({err})") from None
    out = Path(out_dir) if out_dir else grid_dir / "report"
    report = build_report(load(grid_dir), out, metric=metric, failure=failure, formula=formula, top=top, goal=goal,
                          split_by=split_by, require_model=True)
    click.echo(report.summary_text())


if __name__ == "__main__":  # pragma: no cover
    main()
