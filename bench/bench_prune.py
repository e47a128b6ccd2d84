"""Pruning: compute saved and false prunes of a rule chosen by replay, on the demo grid (or another spec).

The grid: ``grids/demo.yaml`` by default, the README's 24 DnCNNs (3 losses x 2 skip schemes x 2 depths x
2 widths, 500 steps at 64 x 64), with the validation metric on (``val_ssim``, ``val_mae`` and their best so
far every ``eval_every`` steps on 16 fixed test images) and the demo's failure rule. ``--spec`` takes another
spec, ``--grid key=v1,v2`` replaces one of its grid keys, ``--steps`` its step count.

1. **Pilot.** The grid runs unpruned with seed 0 (``fixed: {seed: 0}``), two workers.
2. **Choosing a rule by replay.** ``gridrunner.prune.replay`` replays every candidate
   ``step >= S and <metric> <op> T`` (for the best-so-far metrics also with a patience,
   ``and step - <metric>_step >= P``) on the pilot's ``history.jsonl`` files, and builds a list of rules
   from those with no false prune (a prune of a row that finished ``done``), none one threshold looser
   either, greedily by the row-seconds they save (:func:`choose`).
3. **Other seeds, side by side.** The same grid with seed 1 (``--seed``) runs twice at once, one worker each: without
   the rule (the reference) and with it (``prune:``). Compute is the sum of the rows' ``runtime_s``
   (row-seconds: the row's process from fork to result, start-up and testing included). A false prune
   is a row pruned in the pruned run whose twin in the reference run finished ``done``.

It also measures the validation metric's cost: ``eval_s`` (the time spent validating, from every row's
``metrics.json``) against the row's training time (steps / ``train_images_per_s`` · batch).

    .venv/bin/python bench/bench_prune.py             # the demo grid (about 13 minutes on 2 idle cores)
    .venv/bin/python bench/bench_prune.py --quick     # 60 steps, 4 rows: checks the script, not the numbers
    .venv/bin/python bench/bench_prune.py --reuse-pilot   # keep a finished pilot of the same spec
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import fmt  # noqa: E402

DEMO = common.ROOT / "grids" / "demo.yaml"
#: The longest a pilot or the side-by-side runs may take: a 1,000-step grid of 36 rows takes over an hour per run
#: on a slow 2-core machine.
RUN_TIMEOUT_S = 4 * 3600


def load_base(path: Path, grid_overrides: list[str], steps: int | None) -> dict:
    """The spec the bench's grids are made from: ``path`` with ``key=v1,v2`` grid overrides and ``steps``."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    for item in grid_overrides:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid takes key=v1,v2, got {item!r}")
        spec["grid"][key] = [yaml.safe_load(v) for v in values.split(",")]
        spec["fixed"].pop(key, None)  # a fixed value becomes a grid axis
    if steps is not None:
        spec["fixed"]["steps"] = steps
        spec["fixed"]["checkpoint_every"] = max(steps // 2, 1)
    return spec


def write_grid_spec(path: Path, base: dict, name: str, seed: int, cache: Path, prune: list | None = None) -> Path:
    spec = copy.deepcopy(base)
    spec["name"] = name
    spec["fixed"].update(seed=seed, cache_dir=str(cache), examples=0)
    spec.pop("prune", None)
    if prune:
        spec["prune"] = prune
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def eval_points(fixed: dict) -> tuple[int, int]:
    """(steps, steps between validations), by the MRI tasks' own schedule."""
    import dataclasses

    from gridrunner.tasks.mri.training import TrainingConfig

    config = TrainingConfig(**{f.name: fixed[f.name] for f in dataclasses.fields(TrainingConfig) if f.name in fixed})
    return config.steps, config.schedule[1]


def rows_of(grid_dir: Path) -> dict:
    """row_id -> {params..., status, runtime_s, error} through gridrunner's store."""
    from gridrunner.spec import decode_cell
    from gridrunner.store import ERROR, RUNTIME, STATUS, GridStore

    out = {}
    for shard in GridStore(grid_dir).read_all():
        p = shard.n_params
        for i in shard.valid():
            fields = shard.records[i]
            params = {name: decode_cell(cell) for name, cell in zip(shard.params, fields[:p]) if cell != ""}
            out[fields[p]] = {**params, "status": fields[p + STATUS], "error": fields[p + ERROR],
                              "runtime_s": float(fields[p + RUNTIME] or 0.0)}
    return out


def run_grid(spec: Path, runs: Path, workers: int) -> tuple[Path, common.Timed]:
    grid_dir = common.make_grid(spec, runs)
    timed = common.run_processes(common.gridrunner_workers(grid_dir, workers), timeout_s=RUN_TIMEOUT_S)
    return grid_dir, timed


#: (metric, comparison, thresholds from the strictest to the loosest): a looser threshold prunes more.
FAMILIES = [("val_ssim", "<", (0.3, 0.4, 0.5, 0.6)), ("val_mae", ">", (0.5, 0.3, 0.2, 0.1)),
            ("val_ssim_best", "<", (0.3, 0.4, 0.5, 0.6)), ("val_mae_best", ">", (0.3, 0.2, 0.1, 0.05))]
#: Patience, in validations: the best-so-far families again, on a row whose best is that many validations old
#: (``step - val_ssim_best_step >= P``), which a row that is still improving, however slowly, never is.
PATIENCE = (3, 6)


class Candidate(NamedTuple):
    result: object  # the rule's ReplayResult on the pilot
    looser: str | None  # the same rule one threshold looser; None for the loosest
    step: int  # the step it starts at


def candidate_rules(steps: int, every: int) -> list[tuple[str, str | None, int]]:
    """(rule, the same rule one threshold looser or None for the loosest, the step it starts at) at
    validation points from 4% to 40% of the steps; the best-so-far families also with each patience."""
    at = sorted({max(round(steps * f / every), 1) * every for f in (0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.4)})
    out = []
    waits = [""] + [f" and step - {{metric}}_step >= {p * every}" for p in PATIENCE]
    for metric, op, thresholds in FAMILIES:
        for wait in waits if metric.endswith("_best") else [""]:
            for s in at:
                rules = [f"step >= {s} and {metric} {op} {t}" + wait.format(metric=metric) for t in thresholds]
                out += [(rule, rules[i + 1] if i + 1 < len(rules) else None, s) for i, rule in enumerate(rules)]
    return out


def choose(candidates: dict, pilot_dir: Path, replay) -> tuple[list[str], str]:
    """The rules to prune with, chosen on the pilot: a list (``prune:`` takes one; a row is pruned when any
    of them fires), built greedily from the candidates that are safe.

    Safe: no false prune on the pilot, and none with its threshold one notch looser either (a margin: a
    rule right at the edge of a done row's curve is the one another seed crosses). A list prunes a row
    when one of its rules does, so a list of safe rules has no false prune on the pilot. Greedy: start from
    the safe rule that saves the most, then add the one that adds the most to the list's saving (an early
    rule for the plain failures, a later one for those that look like slow starters at first), while it
    adds at least 1% of the pilot's compute. Without a safe rule, the clean one that saves the most.
    ``candidates``: rule -> :class:`Candidate`.
    Returns (rules, why)."""
    clean = {rule: c.result for rule, c in candidates.items() if c.result.pruned and not c.result.false_prunes}
    safe = [rule for rule in clean
            if candidates[rule].looser is not None and not candidates[candidates[rule].looser].result.false_prunes]
    if not safe:
        if not clean:
            return [], ""
        return [max(clean, key=lambda rule: clean[rule].saved_s)], \
            "the most saved with no false prune; no clean rule had a clean looser neighbour"
    total = next(iter(clean.values())).total_s
    chosen = [max(safe, key=lambda rule: clean[rule].saved_s)]
    saved = clean[chosen[0]].saved_s
    while True:
        gains = {rule: replay(pilot_dir, chosen + [rule]).saved_s - saved for rule in safe if rule not in chosen}
        best = max(gains, key=gains.get, default=None)
        if best is None or gains[best] < 0.01 * total:
            break
        chosen.append(best)
        saved += gains[best]
    # In step order, as a reader would write them; the list prunes the same rows either way.
    chosen.sort(key=lambda rule: candidates[rule].step)
    return chosen, ("greedily, from the rules with no false prune on the pilot and none one threshold looser, "
                    "while each added at least 1% of the pilot's compute")


def eval_cost(grid_dir: Path, batch: int) -> list[float]:
    """Per row: validation seconds / training seconds, from ``metrics.json``."""
    shares = []
    for path in sorted((grid_dir / "rows").glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if m.get("train_images_per_s") and m.get("steps_run"):
            train_s = m["steps_run"] * batch / m["train_images_per_s"]
            shares.append(m["eval_s"] / train_s)
    return shares


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(common.ROOT))
    except ValueError:
        return str(path)


def _levels(values) -> str:
    return ", ".join(map(str, values))


def _fixed_text(fixed: dict) -> str:
    keep = ("learning_rate", "size", "noise", "bn_momentum", "kernel", "threads")
    return ", ".join(f"{k} {fixed[k]}" for k in keep if k in fixed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEMO, help="the grid spec to run (default: grids/demo.yaml)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace one of the spec's grid keys (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per row (default: the spec's)")
    parser.add_argument("--quick", action="store_true", help="60 steps, 4 rows; checks the script")
    parser.add_argument("--no-readme", action="store_true", help="print the section, leave bench/README.md alone")
    parser.add_argument("--seed", type=int, default=1,
                        help="the seed of the side-by-side runs (default 1; the pilot's is 0)")
    parser.add_argument("--reuse-pilot", action="store_true",
                        help="keep a finished pilot of the same spec from an earlier run instead of running it again")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.grid = 60, ["loss=l1,ssim", "skip=resnet", "depth=3", "filters=8", *args.grid]
    base = load_base(args.spec, args.grid, args.steps)
    steps, every = eval_points(base["fixed"])
    batch = int(base["fixed"].get("batch_size", 8))
    from gridrunner.prune import replay

    load_before = common.load_average()
    started = time.perf_counter()
    work = common.RUNS / "prune"
    cache = common.RUNS / "prune-cache"  # the MRI pairs, kept between runs (built by the first row otherwise)
    cache.mkdir(parents=True, exist_ok=True)
    runs = work / "runs"
    pilot_spec = write_grid_spec(common.RUNS / "prune-pilot.yaml", base, "pilot", 0, cache)
    reuse = (args.reuse_pilot and (runs / "pilot" / "spec.source.yaml").exists()
             and (runs / "pilot" / "spec.source.yaml").read_text() == pilot_spec.read_text()
             and all(r["status"] in ("done", "failed") for r in rows_of(runs / "pilot").values()))
    if reuse:
        for name in ("reference", "pruned"):
            common.shutil.rmtree(runs / name, ignore_errors=True)
        pilot_dir, pilot_time = runs / "pilot", None
    else:
        common.shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        pilot_dir, pilot_time = run_grid(pilot_spec, runs, 2)
    pilot_rows = rows_of(pilot_dir)
    pilot_failed = sum(r["status"] == "failed" for r in pilot_rows.values())
    pilot_compute = sum(r["runtime_s"] for r in pilot_rows.values())
    pilot_failed_s = sum(r["runtime_s"] for r in pilot_rows.values() if r["status"] == "failed")

    candidates = {rule: Candidate(replay(pilot_dir, [rule]), looser, step)
                  for rule, looser, step in candidate_rules(steps, every)}
    chosen, why = choose(candidates, pilot_dir, replay)

    pilot_choice = replay(pilot_dir, chosen) if chosen else None
    side_lines = []
    if chosen:
        reference_spec = write_grid_spec(work / "reference.yaml", base, "reference", args.seed, cache)
        pruned_spec = write_grid_spec(work / "pruned.yaml", base, "pruned", args.seed, cache, prune=chosen)
        reference_dir = common.make_grid(reference_spec, runs)
        pruned_dir = common.make_grid(pruned_spec, runs)
        side = common.run_processes(common.gridrunner_workers(reference_dir, 1)
                                    + common.gridrunner_workers(pruned_dir, 1), timeout_s=RUN_TIMEOUT_S)
        # Twins have the same row id: the two specs make the same parameters.
        reference, pruned = rows_of(reference_dir), rows_of(pruned_dir)
        ref_compute = sum(r["runtime_s"] for r in reference.values())
        pruned_compute = sum(r["runtime_s"] for r in pruned.values())
        pruned_rows = {rid: r for rid, r in pruned.items() if r["error"].startswith("Pruned:")}
        false_prunes = sorted(rid for rid in pruned_rows if reference[rid]["status"] == "done")
        ref_failed = {rid for rid, r in reference.items() if r["status"] == "failed"}
        caught = len(ref_failed & set(pruned_rows))
        ref_failed_s = sum(reference[rid]["runtime_s"] for rid in ref_failed)
        # What the prune saved on the rows it stopped, against what their twins cost unpruned.
        on_pruned = sum(reference[rid]["runtime_s"] - pruned[rid]["runtime_s"] for rid in pruned_rows)
        # What the replay promised for these seeds: the chosen rule replayed on the reference run.
        promised = replay(reference_dir, chosen)
        side_lines = [
            f"**Seed {args.seed}, side by side** (one worker each, at the same time, {fmt(side.wall_s)} s):",
            "",
            common.table(["run", "rows", "failed", "pruned", "compute (row-s)", "false prunes"],
                         [["without the rule", len(reference), len(ref_failed), 0, fmt(ref_compute), "–"],
                          ["with the rule", len(pruned), sum(r["status"] == "failed" for r in pruned.values()),
                           len(pruned_rows), fmt(pruned_compute), len(false_prunes)]]),
            "",
            f"Compute saved: {fmt(ref_compute - pruned_compute)} row-seconds, "
            f"{100 * (1 - pruned_compute / max(ref_compute, 1e-9)):.1f}% of the reference's "
            f"row-seconds. The rule caught {caught} of the {len(ref_failed)} rows that failed in the reference run; "
            f"false prunes (pruned here, `done` in the reference): {', '.join(false_prunes) or 'none'}. Prune steps: "
            + (", ".join(f"{rid} at {r['error'].rsplit(' ', 1)[-1]}" for rid, r in sorted(pruned_rows.items()))
               or "none") + f". The reference's failed rows took {fmt(ref_failed_s)} row-seconds "
            f"({100 * ref_failed_s / max(ref_compute, 1e-9):.1f}% of its compute, the most a rule without a false prune "
            f"could save); the pruned rows cost {fmt(on_pruned)} row-seconds less than their unpruned twins. "
            "The chosen rules replayed on the reference run promised "
            f"{fmt(promised.saved_s)} row-seconds ({100 * promised.saved_s / max(promised.total_s, 1e-9):.1f}%), "
            f"{promised.pruned} prune{'' if promised.pruned == 1 else 's'}, {len(promised.false_prunes)} false.",
            "",
        ]
    shares = eval_cost(pilot_dir, batch)
    minutes = (time.perf_counter() - started) / 60

    lines = common.section("Pruning doomed rows", load_before, minutes)
    lines += [
        f"The grid: {len(pilot_rows)} rows of `{_relative(args.spec)}`"
        + (f" with {', '.join(f'`{g}`' for g in args.grid)}" if args.grid else "")
        + f" ({' × '.join(f'{k} {_levels(v)}' for k, v in base['grid'].items())}; {steps} steps of batch {batch}; "
        f"{_fixed_text(base['fixed'])}), validation every {every} steps on "
        f"{base['fixed'].get('eval_images', 16)} fixed test images, failure rule `{base.get('failure')}`.",
        "",
        f"**Pilot** (seed 0, 2 workers): {pilot_failed} of {len(pilot_rows)} rows failed; "
        f"{fmt(pilot_compute)} row-seconds" + (f" in {fmt(pilot_time.wall_s)} s." if pilot_time else
                                                 " (kept from an earlier run: `--reuse-pilot`)."),
        "",
        "**Replay on the pilot** (`gridrunner replay-prune RULE`); saved = Σ over the pruned rows of the time from "
        "the record a rule fires on to the row's end (the records' logged times, `started_at` and `runtime_s`). "
        f"Failed rows took {fmt(pilot_failed_s)} row-seconds of the pilot's {fmt(pilot_compute)} "
        f"({100 * pilot_failed_s / max(pilot_compute, 1e-9):.1f}%): no rule without a false prune saves more.",
        "",
        "<details><summary>All " + str(len(candidates)) + " candidate rules</summary>",
        "",
        common.table(["rule", "pruned", "of them failed", "false prunes", "saved row-s", "saved %"],
                     [[f"`{rule}`", r.pruned, r.pruned - len(r.false_prunes), len(r.false_prunes), fmt(r.saved_s),
                       f"{100 * r.saved_s / max(r.total_s, 1e-9):.1f}%"] for rule, (r, _, _) in candidates.items()]),
        "",
        "</details>",
        "",
        (f"Chosen: {', '.join(f'`{rule}`' for rule in chosen)} ({why}); on the pilot it prunes "
         f"{pilot_choice.pruned} rows and saves {fmt(pilot_choice.saved_s)} row-seconds "
         f"({100 * pilot_choice.saved_s / max(pilot_choice.total_s, 1e-9):.1f}%).") if chosen else
        "**No candidate prunes anything without a false prune**, so no rule was chosen and the side-by-side run "
        "with other seeds was not made (it would have compared two unpruned runs): compute saved 0%.",
        "",
        *side_lines,
        f"**The validation metric's cost** (pilot, {len(shares)} rows): validating took "
        f"{fmt(100 * common.median(shares))}% of the training time per row (median; "
        f"{common.spread([100 * s for s in shares])}%): `eval_s` in `metrics.json` over the training time, "
        f"steps · batch / `train_images_per_s`. Per step, with it on, that is the training step's time × (1 + that "
        f"share); off, the training step alone (the final metrics are the same either way: "
        f"`tests/tasks/test_mri_training.py`).",
    ]
    common.publish("prune", lines, readme=not args.no_readme)


if __name__ == "__main__":
    main()
