"""The report: assembles the tables and figures of the other modules into files, and says nothing new.

``build_report(df, out_dir)`` writes, under ``out_dir``:

* ``index.html`` (self-contained apart from the PNGs beside it) and ``report.md``, the same sections;
* one CSV per table (``outcome_model.csv`` and ``failure_model.csv`` have the columns
  ``term, estimate, ci_low, ci_high, p_value``);
* one PNG per figure.

``Report.summary_text()`` is the one-screen summary ``gridrunner analyze`` prints.
"""
from __future__ import annotations

import html
import os
import platform
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from gridrunner.analysis import plots
from gridrunner.analysis.compute import budget_sentence, budget_table, pareto_front
from gridrunner.analysis.conditions import Conditions, failure_conditions
from gridrunner.analysis.kinds import failure_kinds, pruning_table, stopped_sentences
from gridrunner.analysis.failure import failure_interactions, failure_model, failure_rates, pair_rates
from gridrunner.analysis.fit import COLUMNS, Fit, pretty_term, strongest
from gridrunner.analysis.importance import importance
from gridrunner.analysis.outcome import outcome_model
from gridrunner.analysis.rows import (
    benchmark_value,
    counts_sentence,
    label_rows,
    outcomes_of,
    params_of,
    resolve_goal,
    resolve_metric,
    rule_thresholds,
    state_counts,
)
from gridrunner.analysis.tables import level_summary, runtime_by_level, top_configurations
from gridrunner.atomic import why_failed
from gridrunner.errors import GridError

PACKAGES = ["gridrunner", "numpy", "pandas", "scipy", "statsmodels", "patsy", "scikit-learn", "matplotlib"]
#: Interaction tables shown for at most this many pairs of parameters.
MAX_PAIRS = 3


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`build_report` found and wrote. ``files`` lists every path written."""

    grid: str
    out_dir: Path
    metric: str
    goal: str
    failure: str | None
    counts: str
    outcome: Fit
    failure_fit: Fit
    importance: pd.DataFrame
    top: pd.DataFrame
    interactions: pd.DataFrame
    conditions: Conditions
    kinds: pd.DataFrame
    stopped: list[str]
    front: pd.DataFrame
    budgets: pd.DataFrame
    made_at: str
    versions: dict[str, str]
    files: list[Path] = field(default_factory=list)
    #: Figures that could not be drawn (file name -> why), each replaced by a figure that says so.
    undrawn: dict[str, str] = field(default_factory=dict)

    @property
    def html_path(self) -> Path:
        return self.out_dir / "index.html"

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / "report.md"

    def summary_text(self, width: int = 100) -> str:
        """Counts, the strongest effects on outcome and on failure, and the top 5: one screen."""
        lines = [f"Grid {self.grid}. Failure rule: {self.failure or '(none: only exceptions count)'}", self.counts]
        lines.append(f"Outcome {self.metric} ({self.outcome.method}). {self.outcome.usage}")
        lines += _effect_lines(self.outcome, scale=1.0, unit="")
        lines.append(f"Failure ({self.failure_fit.method.split(';')[0]}). {self.failure_fit.usage}")
        lines += [f"  {note}" for note in self.failure_fit.notes if note.startswith(("every failure", "no row with", "every row with", "the logit"))]
        lines += _effect_lines(self.failure_fit, scale=100.0, unit=" pp")
        standing = self.interactions[self.interactions["stands_out"]] if not self.interactions.empty else self.interactions
        for row in standing.head(2).itertuples():
            lines.append(f"  interaction on failure: {row.param_a} × {row.param_b} (F = {row.F:.1f}, p = {row.p_value:.2g})")
        lines.append(f"Failure conditions: {self.conditions.sentence}")
        if len(self.kinds):
            lines.append("  failure kinds: " + ", ".join(f"{r.kind} {r.rows}" for r in self.kinds.itertuples()))
        lines += [f"  {sentence}" for sentence in self.stopped]
        if not self.importance.empty:
            shares = ", ".join(f"{r.effect} {r.variance_share:.0%}" for r in self.importance.head(4).itertuples())
            lines.append(f"Importance (random-forest fANOVA): {shares}")
        if len(self.front):
            lines.append(f"Compute: {len(self.front)} row{'s' * (len(self.front) != 1)} on the Pareto front of {self.metric} vs runtime; "
                         + (budget_sentence(self.budgets, self.metric) or ""))
        lines.append(f"Top 5 by {self.metric} ({'highest' if self.goal == 'max' else 'lowest'} first):")
        if self.top.empty:
            lines.append("  no successful row yet")
        else:
            lines += ["  " + line for line in self.top.head(5).to_string(index=False, float_format=lambda v: f"{v:.4g}").splitlines()]
        lines.append(f"Report: {self.html_path}")
        wrapped = []
        for line in lines:
            if len(line) <= width or line.startswith("   "):  # table lines are cut, prose is wrapped
                wrapped.append(line if len(line) <= width else line[: width - 1] + "…")
            else:
                indent = " " * (len(line) - len(line.lstrip()))
                wrapped += textwrap.wrap(line, width, subsequent_indent=indent + "  ")
        return "\n".join(wrapped)


def _effect_lines(fit: Fit, scale: float, unit: str, n: int = 3) -> list[str]:
    if not fit.fitted:
        return [f"  not fitted: {fit.reason}" if fit.reason else f"  {note}" for note in fit.notes[-1:]]
    baselines = fit.baselines
    rows = strongest(fit.table, n)
    if rows.empty:
        return ["  no term is significant at p < 0.05"]
    return [
        f"  {pretty_term(r.term, baselines)}: {scale * r.estimate:+.3g}{unit} "
        f"[{scale * r.ci_low:.3g}, {scale * r.ci_high:.3g}], p = {r.p_value:.2g}"
        for r in rows.itertuples()
    ]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    metric: str | None = None,
    failure: str | None = None,
    formula: str | None = None,
    top: int = 10,
    goal: str | None = None,
    split_by: str | None = None,
    require_model: bool = False,
) -> Report:
    """Analyse ``df`` (from ``gridrunner.load``) and write the report under ``out_dir``.

    ``metric``, ``failure`` and ``goal`` (``"max"``/``"min"``) override the spec's; ``formula`` replaces
    the outcome model's default formula; ``split_by`` picks the parameter the metric histogram is split
    by (default: the one whose levels differ most in failure rate).
    """
    out_dir = Path(out_dir)
    _check_writable(out_dir)  # before the models: minutes of fitting must not end in a report that cannot be written
    df = label_rows(df, failure)
    rule = df.attrs.get("failure")
    response = _response(formula) if formula else None
    if response in df.columns and response not in outcomes_of(df):
        raise GridError(f"the formula {formula!r} models {response!r}, which is not an outcome "
                        f"(outcomes: {', '.join(outcomes_of(df)) or 'none'})")
    metric = resolve_metric(df, metric or (response if response in df.columns else None))
    goal = resolve_goal(df, metric, goal)
    grid = df.attrs.get("grid") or out_dir.parent.name
    outcome = outcome_model(df, metric, formula=formula)
    failure_fit = failure_model(df)
    if require_model and not outcome.fitted and not failure_fit.fitted:
        raise GridError(
            f"{df.attrs.get('grid_dir') or grid}: no model can be fitted: outcome model: "
            f"{outcome.reason or 'not fitted'}; failure model: {failure_fit.reason or 'not fitted'}"
        )
    with _writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    budgets = budget_table(df, metric, goal)
    report = Report(
        grid=grid,
        out_dir=out_dir,
        metric=metric,
        goal=goal,
        failure=rule,
        counts=counts_sentence(df),
        outcome=outcome,
        failure_fit=failure_fit,
        importance=importance(df, metric),
        top=top_configurations(df, metric, top, goal),
        interactions=failure_interactions(df),
        conditions=failure_conditions(df),
        kinds=failure_kinds(df),
        stopped=stopped_sentences(df),
        front=pareto_front(df, metric, goal),
        budgets=budgets,
        made_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions(),
    )
    rates = failure_rates(df)
    sections = _sections(df, report, rates, split_by)
    markdown, page = _markdown(report, sections), _html(report, sections)
    with _writing(out_dir):
        for section in sections:
            for caption, table in section.tables:
                path = out_dir / f"{_slug(caption)}.csv"
                write_csv(table, path)
                report.files.append(path)
        report.files.append(_write(out_dir / "report.md", markdown))
        report.files.append(_write(out_dir / "index.html", page))
    return report


def _check_writable(out_dir: Path) -> None:
    """A GridError that names ``out_dir`` where the report cannot go: the nearest folder that exists on its
    way is a file, or cannot be written. :func:`_writing` catches what this look cannot foresee."""
    place = out_dir
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    if os.path.lexists(place) and not place.is_dir():
        raise GridError(f"{out_dir}: cannot write the report there: {place} is not a directory (pass --out DIR)")
    if not os.access(place, os.W_OK | os.X_OK):
        raise GridError(f"{out_dir}: cannot write the report there: {place} is not writable (pass --out DIR)")


@contextmanager
def _writing(out_dir: Path):
    """Turns a failed write of the report's files into one GridError that names ``out_dir`` and why."""
    try:
        yield
    except OSError as err:
        raise GridError(f"{out_dir}: cannot write the report ({why_failed(err)}); pass --out DIR for another "
                        f"place") from None


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write one of the report's tables: every text cell, header included, through
    :func:`gridrunner.spec.text_cell`, so that no cell starts a spreadsheet formula except a number (a
    level ``=1+1`` is written ``"=1+1"``, as in the shards); numbers are written as pandas writes them."""
    from gridrunner.spec import text_cell

    def safe(value):
        return text_cell(value) if isinstance(value, str) else value

    out = table.copy()
    for column in out.columns:
        if not (pd.api.types.is_numeric_dtype(out[column].dtype) or pd.api.types.is_bool_dtype(out[column].dtype)):
            out[column] = out[column].astype(object).map(safe)
    out.columns = [safe(str(c)) for c in out.columns]
    out.to_csv(path, index=False)


def _response(formula: str) -> str:
    return formula.split("~", 1)[0].strip() if "~" in formula else formula


def _save(draw, out_dir: Path, name: str, report: Report) -> str:
    """Draw the figure ``draw()`` returns into ``<name>.png``. Where matplotlib cannot draw the data
    (axis limits past the largest float: "arange: cannot compute length", a histogram of such values), the
    file says so in words instead, and :attr:`Report.undrawn` records why for the section's text."""
    path = out_dir / f"{name}.png"
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            fig = draw()
            with _writing(out_dir):
                fig.savefig(path, dpi=100)
    except (ValueError, OverflowError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
        report.undrawn[path.name] = f"matplotlib cannot draw these values ({reason})"
        with _writing(out_dir):
            plots.message_figure(name.replace("_", " "), f"Not drawn: {report.undrawn[path.name]}.").savefig(path, dpi=100)
    report.files.append(path)
    return path.name


def _split_parameter(df: pd.DataFrame, rates: pd.DataFrame, split_by: str | None) -> str | None:
    if split_by is not None:
        renamed = df.attrs.get("renamed") or {}  # the spec's names: split by state, shown as param_state
        split_by = renamed.get(split_by, split_by)
        if split_by not in params_of(df):
            back = {new: old for old, new in renamed.items()}
            names = ", ".join(back.get(p, p) for p in params_of(df))
            raise GridError(f"unknown parameter {split_by!r} to split by (parameters: {names})")
        return split_by
    if rates.empty:
        return None
    spread = rates.groupby("param")["failure_rate"].agg(lambda r: r.max() - r.min())
    spread = spread[[p for p in spread.index if rates.loc[rates["param"] == p, "level"].nunique() <= 6]]
    return spread.idxmax() if len(spread) and spread.max() > 0 else None


def _sections(df: pd.DataFrame, report: Report, rates: pd.DataFrame, split_by: str | None) -> list[Section]:
    out, metric = report.out_dir, report.metric
    spec_names = {new: old for old, new in (df.attrs.get("renamed_outcomes") or {}).items()}
    thresholds = rule_thresholds(report.failure, spec_names.get(metric, metric))  # the rule uses the spec's names
    split = _split_parameter(df, rates, split_by)
    sections = []

    summary = Section("Rows", [report.counts, f"Failure rule: `{report.failure}`." if report.failure else "No failure rule: only rows that raised or died count as failed."])
    summary.tables.append(("counts", state_counts(df)))
    if report.stopped:
        summary.text += [sentence + "." for sentence in report.stopped]
    errors, first_error = df.attrs.get("rule_errors") or (0, None)
    if errors:
        summary.text.append(f"The failure rule cannot be evaluated on {errors} row{'s' * (errors != 1)} (first: {first_error}); "
                            "it does not fire there (the worker records such a row as a RuleError).")
    for kind, key in (("parameter", "renamed"), ("outcome", "renamed_outcomes")):
        for name, shown in (df.attrs.get(key) or {}).items():
            summary.text.append(f"The {kind} `{name}` is shown as `{shown}`: the analysis uses `{name}` for a column of its own.")
    summary.tables.append(("failure_kinds", report.kinds))
    pruning = pruning_table(df)
    if len(pruning):
        summary.tables.append(("pruning", pruning))
    summary.images.append((_save(lambda: plots.runtime_histogram(df), out, "runtime_histogram", report), "Runtime histogram"))
    sections.append(summary)

    compute = Section(f"Compute: {metric} against runtime", [
        f"Rows on the Pareto front: no row that ran no longer has a better {metric} ({len(report.front)} of them, fastest first). "
        "The best row within each runtime budget is circled on the plot.",
        (budget_sentence(report.budgets, metric) or f"No successful row has both {metric} and a runtime.") + ".",
    ])
    compute.tables.append(("pareto_front", report.front))
    compute.tables.append(("runtime_budgets", report.budgets))
    compute.images.append((_save(lambda: plots.metric_vs_runtime(df, metric, goal=report.goal, budgets=report.budgets), out, "metric_vs_runtime", report), f"{metric} vs runtime"))
    sections.append(compute)

    fit = report.outcome
    outcome = Section(f"Outcome model: {metric}", [fit.method + ".", f"Formula: `{fit.formula}`." if fit.formula else "", fit.usage]
                      + ([f"Not fitted: {fit.reason}."] if fit.reason else []) + [f"Note: {n}." for n in fit.notes])
    outcome.tables.append(("outcome_model", fit.table[COLUMNS]))
    if "anova" in fit.extra:
        outcome.tables.append(("outcome_anova", fit.extra["anova"]))
    outcome.images.append((_save(lambda: plots.coefficient_plot(fit, f"effect on {metric} (95% interval; dark: p < 0.05)"), out, "outcome_coefficients", report), "Outcome coefficients"))
    sections.append(outcome)

    fit = report.failure_fit
    failing = Section("Failure model", [fit.method + ".", f"Formula: `{fit.formula}`." if fit.formula else "", fit.usage] + [f"Note: {n}." for n in fit.notes])
    if fit.fitted:
        failing.text.append("Estimates are average marginal effects: the mean change in the probability of failure (0 to 1).")
    elif fit.reason:
        failing.text.append(f"Not fitted: {fit.reason}.")
    failing.text.insert(0, f"Failure conditions: {report.conditions.sentence}.")
    failing.tables.append(("failure_conditions", report.conditions.table))
    failing.tables.append(("failure_model", fit.table[COLUMNS]))
    for key, caption in (("logit", "failure_logit"), ("firth_logit", "failure_firth_logit"), ("lpm", "failure_lpm"), ("term_tests", "failure_term_tests")):
        if key in fit.extra:
            failing.tables.append((caption, fit.extra[key][COLUMNS] if key != "term_tests" else fit.extra[key]))
    failing.images.append((_save(lambda: plots.coefficient_plot(fit, "change in failure probability (95% interval; dark: p < 0.05)"), out, "failure_coefficients", report), "Failure effects"))
    failing.tables.append(("failure_rates", rates))
    failing.images.append((_save(lambda: plots.failure_rate_by_parameter(df), out, "failure_rate_by_parameter", report), "Failure rate by parameter"))
    failing.tables.append(("failure_interactions", report.interactions))
    for row in report.interactions[report.interactions["stands_out"]].head(MAX_PAIRS).itertuples():
        failing.text.append(f"The failure rate of {row.param_a} × {row.param_b} is not additive (F = {row.F:.1f}, p = {row.p_value:.2g}); see the cell table.")
        failing.tables.append((f"failure_pair_{row.param_a}_{row.param_b}", pair_rates(df, row.param_a, row.param_b)))
    sections.append(failing)

    imp = report.importance
    importance_section = Section("Importance", [imp.attrs.get("method", "") + ".", "Shares are of the variance of the forest's predictions over the grid of levels."] + [f"Note: {n}." for n in imp.attrs.get("notes", [])])
    importance_section.tables.append(("importance", imp))
    sections.append(importance_section)

    tables = Section("Configurations and levels", [f"The {len(report.top)} best successful rows by {metric} ({'highest' if report.goal == 'max' else 'lowest'} first)."])
    tables.tables.append(("top", report.top))
    tables.tables.append(("levels", level_summary(df, metric)))
    tables.tables.append(("runtime", runtime_by_level(df)))
    tables.images.append((_save(lambda: plots.metric_by_parameter(df, metric), out, "metric_by_parameter", report), f"{metric} by parameter"))
    tables.images.append((_save(lambda: plots.metric_histogram(df, metric, split, thresholds=thresholds, benchmark=benchmark_value(df, metric)), out, "metric_histogram", report), f"{metric} histogram"))
    tables.images.append((_save(lambda: plots.learning_curves(df, metric, goal=report.goal), out, "learning_curves", report), "Learning curves"))
    sections.append(tables)
    return sections


def _slug(caption: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in caption)


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a report
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def _preface(report: Report) -> list[str]:
    made = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    return [f"Made {report.made_at} with {made}."]


def _markdown(report: Report, sections: list[Section]) -> str:
    lines = [f"# Grid {report.grid}: what it taught", ""] + _preface(report) + [""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines += [text for text in section.text if text] + [""]
        for caption, table in section.tables:
            lines += [f"**{caption}** (`{_slug(caption)}.csv`)", ""] + _markdown_table(table) + [""]
        for path, alt in section.images:
            lines.append(f"![{alt}]({path})")
            if path in report.undrawn:
                lines.append(f"({alt}: not drawn, {report.undrawn[path]}.)")
        lines.append("")
    return "\n".join(lines)


def _markdown_table(table: pd.DataFrame, limit: int = 40) -> list[str]:
    if table.empty:
        return ["(empty)"]
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.head(limit).itertuples(index=False)]
    more = [f"({len(table) - limit} more rows in the CSV)"] if len(table) > limit else []
    return [head, rule] + rows + more


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 0 3px; } .meta { color: #666; font-size: 0.9em; }
"""


def _html(report: Report, sections: list[Section]) -> str:
    def inline(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = [f"<h1>Grid {html.escape(report.grid)}: what it taught</h1>"]
    body += [f'<p class="meta">{html.escape(line)}</p>' for line in _preface(report)]
    body.append("<pre>" + html.escape(report.summary_text()) + "</pre>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{inline(text)}</p>" for text in section.text if text]
        for path, alt in section.images:
            body.append(f'<img src="{html.escape(path)}" alt="{html.escape(alt)}">')
            if path in report.undrawn:
                body.append(f"<p>({html.escape(alt)}: not drawn, {html.escape(report.undrawn[path])}.)</p>")
        for caption, table in section.tables:
            body.append(f'<h3>{html.escape(caption)} <small>(<a href="{_slug(caption)}.csv">CSV</a>)</small></h3>')
            shown = table.head(200)
            body.append(shown.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}", escape=True))
            if len(table) > len(shown):
                body.append(f"<p>({len(table) - len(shown)} more rows in the CSV)</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>gridrunner report: {html.escape(report.grid)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
