"""The grid spec: load a YAML file, validate every key, and expand it into rows.

A spec (see the README for the whole contract)::

    name: dncnn                      # default: the file's stem
    task: dncnn                      # tasks/dncnn.py:run, or any importable "module:function"
    grid:                            # a mapping: the Cartesian product of its lists
      depth: [10, 15, 20]            # a list of mappings: the union of several products
      filters: [[16, 16], [32, 16]]  # a candidate that is a list is one list-valued value
      arch: [{filters: 8, reps: 2}]  # a candidate that is a mapping sets linked parameters together
    fixed: {steps: 4000}             # constants passed to every row (not CSV columns)
    exclude: [{loss: ssim, skip: resnet}, "depth > 20 and filters == 128"]
    repeat: 3                        # each combination 3 times, with a `seed` column 0..2
    random: {n: 10, seed: 0, params: {lr: {loguniform: [1e-4, 1e-2]}}}
    max_len: 100                     # rows per shard file
    outcomes: [m_ssim, m_mae]        # the metrics the task returns: the CSV's last columns
    failure: m_ssim < 0.5            # marks a finished row failed by its outcome
    resources: {time_min: 60, gpus: 1, cpus: 4, mem_gb: 16, partition: gpu}
    cost: depth * filters            # ranks rows: expensive ones are claimed first
    lease_s: 120                     # a running row whose worker stops beating this long is reclaimed
    max_attempts: 3                  # after this many worker deaths a row is failed
    prune: step >= 200 and val_ssim < 0.3   # stop a row when its latest logged record matches (or a list)
    hang_after_min: 30               # kill a row that has logged nothing for this long (from its first log)
    row_time_limit_min: 2 * depth    # stop a row running longer (a number or a rule over the parameters)

Expansion is deterministic and content addressed: a row's id is a hash of its canonical
parameters (sorted keys, compact JSON), so a re-made or reordered grid recognises finished work.
Every candidate's cell text and JSON are rendered once, so expanding a million rows only joins
strings; :func:`expand` is a generator and never holds the product in memory.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from gridrunner.errors import ExprError, SpecError
from gridrunner.expr import Expr
from gridrunner.spawner import resolve_task

#: Bookkeeping columns, between the parameters and the outcomes (the CSV contract).
BOOK_COLUMNS = ("row_id", "status", "attempts", "worker", "started_at", "finished_at", "runtime_s", "error")
STATUSES = ("not_run", "running", "done", "failed")
TOP_KEYS = (
    "name", "task", "grid", "fixed", "exclude", "repeat", "random", "max_len", "outcomes",
    "failure", "resources", "cost", "lease_s", "max_attempts", "metric", "goal",
    "prune", "hang_after_min", "row_time_limit_min",
)
RESOURCE_KEYS = ("time_min", "gpus", "cpus", "mem_gb", "partition")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
DEFAULT_MAX_LEN = 100
DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
#: The longest duration gridrunner accepts, in seconds (about 32 years), in a spec or an option: a longer
#: one, or inf or nan, is a typo, and would overflow the clock or the sleep it is added to far from here.
MAX_DURATION_S = 1e9
MAX_MINUTES = MAX_DURATION_S / 60
ROW_ID_LENGTH = 12
_RESERVED = set(BOOK_COLUMNS)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SCALARS = (bool, int, float, str, type(None))


# --------------------------------------------------------------------------- cells and row ids

def canonical_json(value: Any) -> str:
    """The one JSON text of a value that row ids are hashed from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def row_id_of(params: dict) -> str:
    """A row's id: the first 12 hex digits of the SHA-1 of its canonical parameters."""
    return hashlib.sha1(canonical_json(params).encode()).hexdigest()[:ROW_ID_LENGTH]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def text_cell(text: str) -> str:
    """A text cell of a CSV gridrunner writes for people (the report's tables), as no spreadsheet reads it as
    a formula: text that could start one (``= + - @``, a control character), and is not a number such as
    ``-0.5``, is JSON-quoted as :func:`encode_cell` quotes such a parameter (``"=1+1"``); so is text that
    starts with a quote, so that a quoted cell always means this."""
    if text.startswith(_FORMULA_START):
        try:
            float(text)
            return text
        except ValueError:
            return json.dumps(text, ensure_ascii=False)
    if text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def encode_cell(value: Any) -> str:
    """The CSV text of a parameter value. ``decode_cell(encode_cell(v)) == v`` for every spec value.

    Numbers, booleans, None and lists are JSON. A string is written as it is, unless it would read
    back as something else (``"3"``, ``"true"``, ``""``), holds a control character, or could start a
    spreadsheet formula; then it is JSON-quoted (one line, escapes spelled out).
    """
    if isinstance(value, str):
        if (value and value == value.strip() and value.isprintable() and not value.startswith(_FORMULA_START)
                and not value.startswith('"')):
            try:
                json.loads(value)
            except ValueError:
                return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # NaN / Infinity / -Infinity; the last is a number, not a formula
    return json.dumps(value, ensure_ascii=False)


def decode_cell(text: str) -> Any:
    """Inverse of :func:`encode_cell`. Raises :class:`KeyError` for an empty cell (an absent parameter)."""
    if text == "":
        raise KeyError("empty cell")
    first = text[0]
    if first.isalpha() and text not in ("true", "false", "null", "NaN", "Infinity"):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------- YAML with line numbers

class _Loader(yaml.SafeLoader):
    """Safe YAML (no tags that run code) that refuses duplicate keys."""


def _read_yaml(path: Path) -> tuple[Any, dict, list]:
    """The spec's data, the line of every key path, and warnings about values the user likely meant
    otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(path, None, "no such spec file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(path, None, f"cannot read the spec: {err}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError(path, None, "the spec is empty; it needs at least `task`, `grid` and `outcomes`")
        lines: dict[tuple, int] = {}
        notes: list[str] = []
        _walk(node, (), lines, path, [MAX_YAML_VALUES], notes)
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(path, None, f"invalid YAML: {problem}", line) from None
    finally:
        loader.dispose()
    return data, lines, notes


#: A spec may hold at most this many YAML values, counting each use of an alias anew. Aliases of aliases
#: grow exponentially ("billion laughs"): ten levels of ten make 10^10 values from 20 lines, and walking
#: them would hang every command that reads the spec.
MAX_YAML_VALUES = 1_000_000


#: Numbers in YAML 1.2 and in Python that YAML 1.1 reads as strings: an exponent without a dot in the
#: mantissa or without a sign (``1e-3``, ``5E+4``, ``1.5e3``). A grid of such "numbers" would compare,
#: cost and model as strings, silently.
_YAML11_MISSED_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _yaml11_spelling(text: str) -> str:
    """``1e-3`` as YAML 1.1 reads it as a number: ``1.0e-3``."""
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent[:1] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}"


def _walk(node, keypath: tuple, lines: dict, path: Path, budget: list, notes: list) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise SpecError(path, _dotted(keypath[:1]) or None, f"the spec holds more than {MAX_YAML_VALUES:,} values "
                                                            f"(aliases of aliases?); write it out with fewer nested "
                                                            f"aliases", lines.get(keypath[:1]))
    lines[keypath] = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode) and node.style is None and node.tag == "tag:yaml.org,2002:str" \
            and _YAML11_MISSED_FLOAT.match(node.value):
        # A warning, not an error: PyYAML's own safe_dump writes the string "1e-3" so, unquoted.
        where = f"{path}:{node.start_mark.line + 1}, at key {_dotted(keypath)}"
        notes.append(f"{where}: {node.value} is read as the string {node.value!r}: YAML 1.1, which PyYAML "
                     f"follows, needs a dot and a signed exponent in a number; write {float(node.value)!r} or "
                     f"{_yaml11_spelling(node.value)} for the number, or {node.value!r} in quotes to keep the string")
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise SpecError(path, _dotted(keypath + (key,)),
                                f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
            _walk(value_node, keypath + (key,), lines, path, budget, notes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, keypath + (i,), lines, path, budget, notes)


def _dotted(keypath: tuple) -> str:
    out = ""
    for part in keypath:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- the spec

@dataclass
class Spec:
    """A validated spec. ``subgrids`` is a list of ``[(key, [candidate, ...]), ...]``; a candidate is
    a tuple of ``(param, value)`` assignments (one for a plain value, several for linked parameters)."""

    name: str
    task: str
    subgrids: list
    outcomes: list
    fixed: dict = field(default_factory=dict)
    exclude: list = field(default_factory=list)
    repeat: int = 1
    random: dict | None = None
    max_len: int = DEFAULT_MAX_LEN
    failure: str | None = None
    resources: dict = field(default_factory=dict)
    cost: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    metric: str | None = None
    goal: str | None = None
    raw: dict = field(default_factory=dict)
    path: str | None = None
    prune: list = field(default_factory=list)  # rule texts (gridrunner.prune)
    warnings: list = field(default_factory=list)  # about the spec file's text: values likely meant otherwise
    hang_after_min: float | None = None
    row_time_limit_min: float | str | None = None
    lines: dict = field(default_factory=dict, repr=False, compare=False)  # key path -> YAML line, for errors

    @property
    def params(self) -> list[str]:
        """The parameter columns, in the order they first appear in the spec."""
        names: list[str] = []
        for sub in self.subgrids:
            for _, candidates in sub:
                for candidate in candidates:
                    for name, _ in candidate:
                        if name not in names:
                            names.append(name)
        if self.random:
            names += [n for n in self.random["params"] if n not in names]
        if self.repeat > 1 and "seed" not in names:
            names.append("seed")
        return names

    @property
    def columns(self) -> list[str]:
        return self.params + list(BOOK_COLUMNS) + list(self.outcomes)

    def failure_rule(self) -> Expr | None:
        return Expr(self.failure) if self.failure else None

    def cost_expr(self) -> Expr | None:
        return Expr(self.cost) if self.cost else None

    def cost_of(self, cost: Expr, row_params: dict):
        """``cost`` on one row (its parameters and ``fixed``); a :class:`SpecError` at key ``cost`` naming the
        row where it cannot be evaluated (``sqrt`` of a negative number)."""
        try:
            return cost.evaluate(task_params(self.fixed, row_params))
        except ExprError as err:
            raise self.rule_error(("cost",), err, row_params) from None

    def rule_error(self, keypath: tuple, err: ExprError, row_params: dict) -> SpecError:
        """A rule of this spec that failed on a row, as the spec error ``make`` prints: file, key, line, row."""
        row = ", ".join(f"{name}={encode_cell(value)}" for name, value in row_params.items())
        return SpecError(self.path, _dotted(keypath), f"{err} (on the row {row})", self.lines.get(keypath))

    def time_limit(self):
        """None, or a function of a row's task parameters giving ``(minutes or None, error or None)``."""
        limit = self.row_time_limit_min
        if limit is None:
            return None
        if not isinstance(limit, str):
            return lambda params: (float(limit), None)
        expr = Expr(limit)

        def minutes(params):
            try:
                value = expr.evaluate(params)
            except ExprError as err:
                return None, f"RuleError: row_time_limit_min cannot be evaluated on this row: {err}"
            if value is None:
                return None, None  # a parameter this row lacks: no limit, as a missing value never fires a rule
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                return None, (f"RuleError: row_time_limit_min {limit!r} is {value!r} for this row; expected a "
                              f"positive number of minutes")
            if value > MAX_MINUTES:  # a wait that long overflows the watchdog's clock
                return None, (f"RuleError: row_time_limit_min {limit!r} is {value!r} for this row; expected at "
                              f"most {MAX_MINUTES:.0f} minutes")
            return float(value), None

        return minutes

    def size(self) -> int:
        """Rows before ``exclude`` and de-duplication (sizes multiply, sub-grids add)."""
        per = sum(math.prod(len(c) for _, c in sub) for sub in self.subgrids)
        n_random = self.random["n"] if self.random else 1
        return per * n_random * self.repeat

    def resolved(self) -> dict:
        """The spec as saved beside the shards: every default filled in."""
        out = {
            "name": self.name,
            "task": self.task,
            "grid": self.raw.get("grid"),
            "fixed": self.fixed,
            "exclude": self.raw.get("exclude", []),
            "repeat": self.repeat,
            "random": self.raw.get("random"),
            "max_len": self.max_len,
            "outcomes": list(self.outcomes),
            "failure": self.failure,
            "resources": self.resources,
            "cost": self.cost,
            "lease_s": self.lease_s,
            "max_attempts": self.max_attempts,
            "metric": self.metric,
            "goal": self.goal,
            "prune": list(self.prune),
            "hang_after_min": self.hang_after_min,
            "row_time_limit_min": self.row_time_limit_min,
        }
        return out


def load_spec(path: str | Path, check_task: bool = True) -> Spec:
    """Read and validate a spec file. Raises :class:`SpecError` naming the file, key and line."""
    path = Path(path)
    data, lines, notes = _read_yaml(path)
    spec = validate(data, path=path, lines=lines, check_task=check_task)
    spec.warnings = notes
    return spec


def validate(data: Any, path: str | Path | None = None, lines: dict | None = None, check_task: bool = True) -> Spec:
    """Validate a spec mapping (already parsed) and return a :class:`Spec`."""
    v = _Validator(path, lines or {})
    spec = v.spec(data, check_task)
    spec.lines = dict(lines or {})
    return spec


class _Validator:
    def __init__(self, path, lines):
        self.path = path
        self.lines = lines

    def fail(self, keypath: tuple, message: str):
        raise SpecError(self.path, _dotted(keypath) or None, message, self.lines.get(keypath))

    def spec(self, data, check_task: bool) -> Spec:
        if not isinstance(data, dict):
            self.fail((), f"the spec must be a mapping of keys ({', '.join(TOP_KEYS)}), got {_kind(data)}")
        for key in data:
            if key not in TOP_KEYS:
                hint = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                self.fail((key,), f"unknown key {key!r}{did} (valid: {', '.join(TOP_KEYS)})")
        for required in ("task", "grid", "outcomes"):
            if required not in data:
                self.fail((), f"missing required key {required!r}")

        default_name = Path(self.path).stem if self.path else "grid"
        name = data.get("name", default_name)
        if not isinstance(name, str) or not name or any(c in name for c in "/\\\0") or name in (".", ".."):
            self.fail(("name",), f"expected a plain name (letters, digits, '-', '_'), got {name!r}")

        task = self.task(data["task"], check_task)
        outcomes = self.outcomes(data["outcomes"])
        fixed = data.get("fixed") or {}
        if not isinstance(fixed, dict):
            self.fail(("fixed",), f"expected a mapping of constants, got {_kind(fixed)}")
        for key, value in fixed.items():
            self.value(("fixed", key), value)
        subgrids = self.grid(data["grid"])
        repeat = self.positive_int(data, "repeat", 1)
        random = self.random(data["random"]) if data.get("random") is not None else None
        max_len = self.positive_int(data, "max_len", DEFAULT_MAX_LEN)
        max_attempts = self.positive_int(data, "max_attempts", DEFAULT_MAX_ATTEMPTS)
        lease_s = data.get("lease_s", DEFAULT_LEASE_S)
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not lease_s > 0:
            self.fail(("lease_s",), f"expected a positive number of seconds, got {lease_s!r}")
        if not lease_s <= MAX_DURATION_S:
            self.fail(("lease_s",), f"expected at most {MAX_DURATION_S:g} seconds (about 32 years), got {lease_s!r}")

        spec = Spec(
            name=name, task=task, subgrids=subgrids, outcomes=outcomes, fixed=dict(fixed), repeat=repeat,
            random=random, max_len=max_len, lease_s=float(lease_s), max_attempts=max_attempts,
            raw=data, path=str(self.path) if self.path else None,
        )
        params = spec.params
        clash = sorted((set(params) & _RESERVED) | (set(params) & set(outcomes)) | (set(fixed) & _RESERVED))
        if clash:
            self.fail(("grid",), f"{clash[0]!r} is both a parameter and a bookkeeping or outcome column; rename it")
        overlap = sorted(set(params) & set(fixed))
        if overlap:
            self.fail(("fixed", overlap[0]), f"{overlap[0]!r} is both in `fixed` and in the grid; keep one")
        if repeat > 1 and any(name == "seed" for sub in subgrids for name in _sub_params(sub)):
            self.fail(("repeat",), "`repeat` adds a `seed` column, but the grid already has a `seed` parameter")
        spec.exclude = self.exclude(data.get("exclude"), params)
        spec.failure = self.expr(data, "failure", outcomes + params, "outcome or parameter", condition=True)
        spec.cost = self.expr(data, "cost", params + list(fixed), "parameter")
        spec.resources = self.resources(data.get("resources"))
        spec.metric = data.get("metric")
        if spec.metric is not None and spec.metric not in outcomes:
            self.fail(("metric",), f"the metric to analyse must be one of the outcomes ({', '.join(outcomes)}), "
                                   f"got {spec.metric!r}")
        spec.goal = data.get("goal")
        if spec.goal not in (None, "max", "min"):
            self.fail(("goal",), f"expected max (larger is better) or min, got {spec.goal!r}")
        if spec.size() == 0:
            self.fail(("grid",), "the grid is empty: every parameter needs at least one value")
        self.stopping_rules(spec, data, params + list(fixed))
        return spec

    def stopping_rules(self, spec: Spec, data: dict, names: list[str]) -> None:
        """``prune``, ``hang_after_min`` and ``row_time_limit_min`` (see gridrunner.prune and gridrunner.watchdog)."""
        from gridrunner.prune import check_rule

        rules = data.get("prune")
        if rules is None:
            rules = []
        elif isinstance(rules, str):
            rules = [rules]
        elif not isinstance(rules, list):
            self.fail(("prune",), f"expected a rule such as 'step >= 200 and val_ssim < 0.3', or a list of rules, "
                                  f"got {_kind(rules)}")
        for i, rule in enumerate(rules):
            keypath = ("prune", i) if isinstance(data.get("prune"), list) else ("prune",)
            if not isinstance(rule, str):
                self.fail(keypath, f"expected a rule string such as 'step >= 200 and val_ssim < 0.3', got {rule!r}")
            try:
                check_rule(rule, names, BOOK_COLUMNS)
            except ExprError as err:
                self.fail(keypath, str(err))
        spec.prune = list(rules)
        hang = data.get("hang_after_min")
        if hang is not None and (isinstance(hang, bool) or not isinstance(hang, (int, float)) or not 0 < hang < math.inf):
            self.fail(("hang_after_min",), f"expected a positive number of minutes, got {hang!r}")
        if hang is not None and hang > MAX_MINUTES:
            self.fail(("hang_after_min",), f"expected at most {MAX_MINUTES:.0f} minutes (about 32 years), got {hang!r}")
        spec.hang_after_min = None if hang is None else float(hang)
        limit = data.get("row_time_limit_min")
        if isinstance(limit, str):
            try:
                Expr(limit).check_names(names, "parameter")
            except ExprError as err:
                self.fail(("row_time_limit_min",), str(err))
        elif limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                                    or not 0 < limit < math.inf):
            self.fail(("row_time_limit_min",), f"expected a positive number of minutes or a rule over the "
                                               f"parameters such as '2 * depth', got {limit!r}")
        elif limit is not None and limit > MAX_MINUTES:
            self.fail(("row_time_limit_min",), f"expected at most {MAX_MINUTES:.0f} minutes (about 32 years), "
                                               f"got {limit!r}")
        spec.row_time_limit_min = limit if isinstance(limit, str) or limit is None else float(limit)

    # ---- pieces

    def task(self, task, check: bool) -> str:
        if not isinstance(task, str) or not task.strip():
            self.fail(("task",), f"expected 'module:function' or the name of a bundled task (dncnn, unet), got {task!r}")
        task = task.strip()
        if check:
            try:
                resolve_task(task)
            except SpecError as err:
                self.fail(("task",), err.message)
        return task

    def outcomes(self, outcomes) -> list[str]:
        if isinstance(outcomes, str):
            outcomes = [outcomes]
        if not isinstance(outcomes, list) or not outcomes:
            self.fail(("outcomes",), f"expected a non-empty list of metric names, got {outcomes!r}")
        for i, name in enumerate(outcomes):
            if not isinstance(name, str) or not name.isidentifier():
                self.fail(("outcomes", i), f"expected a metric name (letters, digits, _), got {name!r}")
            if name in _RESERVED:
                self.fail(("outcomes", i), f"{name!r} is a bookkeeping column; choose another metric name")
        if len(set(outcomes)) != len(outcomes):
            self.fail(("outcomes",), "metric names repeat")
        return list(outcomes)

    def value(self, keypath: tuple, value) -> None:
        if isinstance(value, _SCALARS):
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.value(keypath + (i,), item)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    self.fail(keypath, f"mapping keys must be strings, got {key!r}")
                self.value(keypath + (key,), item)
            return
        self.fail(keypath, f"unsupported value {value!r} ({type(value).__name__}); use numbers, strings, booleans or lists")

    def grid(self, grid) -> list:
        if isinstance(grid, dict):
            return [self.subgrid(grid, ("grid",))]
        if isinstance(grid, list) and grid and all(isinstance(g, dict) for g in grid):
            return [self.subgrid(g, ("grid", i)) for i, g in enumerate(grid)]
        self.fail(("grid",), f"expected a mapping of parameter lists, or a list of such mappings, got {_kind(grid)}")

    def subgrid(self, sub: dict, keypath: tuple) -> list:
        if not sub:
            self.fail(keypath, "the grid is empty: give at least one parameter with a list of values")
        out = []
        seen_params: dict[str, str] = {}
        for key, values in sub.items():
            kp = keypath + (key,)
            if not isinstance(key, str) or not key.isidentifier():
                self.fail(kp, f"parameter names must be identifiers, got {key!r}")
            if not isinstance(values, list):
                self.fail(kp, f"expected a list of candidate values, got {_kind(values)} {values!r}; "
                              f"write [{values!r}] for one value, or move it to `fixed`")
            if not values:
                self.fail(kp, "the list of candidates is empty; give at least one value")
            candidates = []
            linked_keys = None
            for i, candidate in enumerate(values):
                self.value(kp + (i,), candidate)
                if isinstance(candidate, dict):
                    if not candidate:
                        self.fail(kp + (i,), "a linked candidate needs at least one parameter")
                    keys = list(candidate)
                    for name in keys:
                        if not name.isidentifier():
                            self.fail(kp + (i, name), f"parameter names must be identifiers, got {name!r}")
                    if linked_keys is None:
                        linked_keys = keys
                    elif sorted(keys) != sorted(linked_keys):
                        self.fail(kp + (i,), f"linked candidates must all set the same parameters: "
                                             f"{sorted(linked_keys)} vs {sorted(keys)}")
                    candidates.append(tuple((name, candidate[name]) for name in linked_keys))
                else:
                    if linked_keys is not None:
                        self.fail(kp + (i,), "mix of linked (mapping) and plain candidates; use one kind per key")
                    candidates.append(((key, candidate),))
            if linked_keys is not None and any(not isinstance(c, dict) for c in values):
                self.fail(kp, "mix of linked (mapping) and plain candidates; use one kind per key")
            for name, _ in candidates[0]:
                if name in seen_params:
                    self.fail(kp, f"parameter {name!r} is set by both {seen_params[name]!r} and {key!r}")
                seen_params[name] = key
            out.append((key, candidates))
        return out

    def positive_int(self, data: dict, key: str, default: int) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail((key,), f"expected a positive integer, got {value!r}")
        return value

    def random(self, random) -> dict:
        kp = ("random",)
        if not isinstance(random, dict):
            self.fail(kp, "expected a mapping {n: N, seed: S, params: {name: {uniform: [lo, hi]}, ...}}")
        unknown = set(random) - {"n", "seed", "params"}
        if unknown:
            self.fail(kp + (sorted(unknown)[0],), f"unknown key (valid: n, seed, params)")
        n = random.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            self.fail(kp + ("n",), f"expected a positive number of samples, got {n!r}")
        seed = random.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            self.fail(kp + ("seed",), f"expected an integer seed, got {seed!r}")
        params = random.get("params")
        if not isinstance(params, dict) or not params:
            self.fail(kp + ("params",), "expected a mapping of parameter name to distribution")
        dists = {}
        for name, dist in params.items():
            pk = kp + ("params", name)
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                self.fail(pk, f"expected one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
                              f"{{int: [lo, hi]}}, {{choice: [a, b, ...]}}, got {dist!r}")
            kind, arg = next(iter(dist.items()))
            if kind == "choice":
                if not isinstance(arg, list) or not arg:
                    self.fail(pk + (kind,), "expected a non-empty list of choices")
                self.value(pk + (kind,), arg)
            else:
                if (not isinstance(arg, list) or len(arg) != 2
                        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arg)
                        or not arg[0] < arg[1]):
                    self.fail(pk + (kind,), f"expected [low, high] with low < high, got {arg!r}")
                self.samplable(pk + (kind,), kind, arg)
            dists[name] = (kind, arg)
        return {"n": n, "seed": seed, "params": dists}

    def samplable(self, keypath: tuple, kind: str, arg: list) -> None:
        """Bounds ``[low, high]`` (low < high) that numpy can sample ``kind`` from: finite, with a finite
        range for ``uniform`` (it draws low + (high - low) * u), within int64 for ``int``."""
        if kind == "int":
            if not all(isinstance(a, int) for a in arg):
                self.fail(keypath, "int needs integer bounds")
            if not all(INT64_MIN <= a <= INT64_MAX for a in arg):
                self.fail(keypath, f"int needs bounds within 64-bit integers ({INT64_MIN} to {INT64_MAX}), got {arg!r}")
            return
        try:
            bounds = [float(a) for a in arg]
        except OverflowError:  # an integer beyond any float (10**400)
            bounds = [math.inf]
        if not all(math.isfinite(b) for b in bounds):
            shown = ", ".join(_number_text(a) for a in arg)
            self.fail(keypath, f"the bounds must be finite numbers, got [{shown}]")
        if kind == "loguniform" and bounds[0] <= 0:
            self.fail(keypath, "loguniform needs 0 < low")
        if kind == "uniform" and not math.isfinite(bounds[1] - bounds[0]):
            self.fail(keypath, f"high - low must be a finite number (at most {sys.float_info.max:.2g}) to sample "
                               f"from, got [{', '.join(_number_text(a) for a in arg)}]")

    def exclude(self, exclude, params: list[str]) -> list:
        if exclude is None:
            return []
        if not isinstance(exclude, list):
            self.fail(("exclude",), "expected a list of mappings ({param: value}) or rule strings")
        out = []
        for i, entry in enumerate(exclude):
            kp = ("exclude", i)
            if isinstance(entry, dict):
                if not entry:
                    self.fail(kp, "an empty mapping would exclude every row")
                for key in entry:
                    if key not in params:
                        self.fail(kp + (key,), _unknown_param(key, params))
                out.append(("match", dict(entry)))
            elif isinstance(entry, str):
                try:
                    expr = Expr(entry)
                    expr.check_names(params, "parameter")
                    expr.check_condition("loss == 'ssim' and depth > 15")
                except ExprError as err:
                    self.fail(kp, str(err))
                out.append(("rule", expr))
            else:
                self.fail(kp, f"expected a mapping or a rule string, got {_kind(entry)}")
        return out

    def expr(self, data: dict, key: str, allowed: list[str], what: str, condition: bool = False) -> str | None:
        text = data.get(key)
        if text is None:
            return None
        if not isinstance(text, str):
            self.fail((key,), f"expected a rule string such as 'm_ssim < 0.5', got {text!r}")
        try:
            expr = Expr(text)
            expr.check_names(allowed, what)
            if condition:
                expr.check_condition()
        except ExprError as err:
            self.fail((key,), str(err))
        return text

    def resources(self, resources) -> dict:
        if resources is None:
            return {}
        if not isinstance(resources, dict):
            self.fail(("resources",), f"expected a mapping ({', '.join(RESOURCE_KEYS)})")
        for key, value in resources.items():
            if key not in RESOURCE_KEYS:
                hint = difflib.get_close_matches(str(key), RESOURCE_KEYS, n=1)
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                self.fail(("resources", key), f"unknown resource {key!r}{did} (valid: {', '.join(RESOURCE_KEYS)})")
            if key == "partition":
                if not isinstance(value, str):
                    self.fail(("resources", key), f"expected a partition name, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                self.fail(("resources", key), f"expected a non-negative number, got {value!r}")
            elif key == "time_min" and value > MAX_MINUTES:
                self.fail(("resources", key), f"expected at most {MAX_MINUTES:.0f} minutes (about 32 years), "
                                              f"got {value!r}")
        return dict(resources)


def _sub_params(sub) -> list[str]:
    return [name for _, candidates in sub for name, _ in candidates[0]]


def _unknown_param(key, params) -> str:
    hint = difflib.get_close_matches(str(key), params, n=1)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown parameter {key!r}{did} (parameters: {', '.join(params)})"


def _number_text(value) -> str:
    """A bound as the error shows it: ``inf``, ``1e+308``, ``3``; an integer beyond any float as ``1e+309 or more``."""
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return "1e+309 or more" if value > 0 else "-1e+309 or less"
        return str(value)
    return f"{value:g}"


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- expansion

@dataclass(frozen=True)
class Row:
    row_id: str
    params: dict
    cells: tuple  # one CSV cell per ``Spec.params`` column ('' for a parameter this row lacks)


def expand(spec: Spec) -> Iterator[Row]:
    """Every row of the grid, in a deterministic order, without duplicates.

    Order: sub-grid by sub-grid; within one, the product of its keys in spec order with the last key
    varying fastest; random samples inside that; the repeat seed innermost.
    """
    columns = spec.params
    position = {name: i for i, name in enumerate(columns)}
    extra_axes = []
    if spec.random:
        extra_axes.append(_random_candidates(spec.random))
    if spec.repeat > 1:
        extra_axes.append([(("seed", s),) for s in range(spec.repeat)])
    excludes = spec.exclude
    seen: set[str] = set()
    for sub in spec.subgrids:
        axes = [_render(candidates, position) for _, candidates in sub]
        axes += [_render(candidates, position) for candidates in extra_axes]
        order = sorted({name for axis in axes for cand in axis for name in cand[0]})
        for combo in itertools.product(*axes):
            params: dict = {}
            fragments: dict = {}
            cells = [""] * len(columns)
            for names, values, frags, cand_cells in combo:
                for name, value, frag, cell in zip(names, values, frags, cand_cells):
                    params[name] = value
                    fragments[name] = frag
                    cells[position[name]] = cell
            if excludes and _excluded(params, excludes, spec):
                continue
            canonical = "{" + ",".join(fragments[name] for name in order if name in fragments) + "}"
            row_id = hashlib.sha1(canonical.encode()).hexdigest()[:ROW_ID_LENGTH]
            if row_id in seen:
                continue
            seen.add(row_id)
            yield Row(row_id, params, tuple(cells))


def _render(candidates, position):
    """Per candidate: (names, values, canonical JSON fragments, cells), computed once."""
    out = []
    for candidate in candidates:
        names = tuple(name for name, _ in candidate)
        values = tuple(value for _, value in candidate)
        frags = tuple(canonical_json(name) + ":" + canonical_json(value) for name, value in candidate)
        cells = tuple(encode_cell(value) for value in values)
        out.append((names, values, frags, cells))
    return out


def _random_candidates(random: dict) -> list:
    import numpy as np

    rng = np.random.default_rng(random["seed"])
    samples = []
    for _ in range(random["n"]):
        sample = []
        for name, (kind, arg) in random["params"].items():
            if kind == "uniform":
                value = float(rng.uniform(arg[0], arg[1]))
            elif kind == "loguniform":
                value = float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
            elif kind == "int":
                value = int(rng.integers(arg[0], arg[1], endpoint=True))
            else:
                value = arg[int(rng.integers(0, len(arg)))]
            sample.append((name, value))
        samples.append(tuple(sample))
    return samples


def _excluded(params: dict, excludes: list, spec: Spec) -> bool:
    for i, (kind, entry) in enumerate(excludes):
        if kind == "match":
            if all(k in params and params[k] == v and isinstance(params[k], bool) == isinstance(v, bool)
                   for k, v in entry.items()):
                return True
        else:
            try:
                if entry.evaluate(params):
                    return True
            except ExprError as err:  # log(0) on this row: the spec's mistake, said where it is
                raise spec.rule_error(("exclude", i), err, params) from None
    return False


def task_params(spec_fixed: dict, row_params: dict) -> dict:
    """What a task receives: the spec's fixed constants, then the row's parameters."""
    merged = dict(spec_fixed)
    merged.update(row_params)
    return merged
