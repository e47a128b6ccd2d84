"""What a grid taught: regressions of the hyperparameters on the metric and on failure, tables, plots, a report.

Every function takes the DataFrame of ``gridrunner.load(grid_dir)``::

    import gridrunner
    from gridrunner import analysis
    df = gridrunner.load("runs/dncnn")
    analysis.outcome_model(df, "m_ssim")          # OLS, HC3 errors, type-II ANOVA in .extra["anova"]
    analysis.failure_model(df)                    # logit AMEs; Firth + LPM under separation
    analysis.failure_conditions(df).sentence      # "failed: 6 of 6 rows with act=tanh and lr=0.1; 0 of 30 elsewhere"
    analysis.pareto_front(df, "m_ssim")           # rows no faster row beats
    analysis.build_report(df, "runs/dncnn/report")
"""
from gridrunner.analysis.compute import budget_table, pareto_front
from gridrunner.analysis.conditions import failure_conditions
from gridrunner.analysis.failure import failure_interactions, failure_model, failure_rates, pair_rates
from gridrunner.analysis.importance import importance
from gridrunner.analysis.kinds import failure_kinds, pruning_table
from gridrunner.analysis.outcome import outcome_model
from gridrunner.analysis.plots import (
    coefficient_plot,
    failure_rate_by_parameter,
    learning_curves,
    metric_by_parameter,
    metric_histogram,
    metric_vs_runtime,
    runtime_histogram,
)
from gridrunner.analysis.report import Report, build_report
from gridrunner.analysis.rows import counts_sentence, label_rows, state_counts
from gridrunner.analysis.tables import level_summary, runtime_by_level, top_configurations

__all__ = [
    "Report",
    "budget_table",
    "build_report",
    "coefficient_plot",
    "counts_sentence",
    "failure_conditions",
    "failure_interactions",
    "failure_kinds",
    "failure_model",
    "failure_rate_by_parameter",
    "failure_rates",
    "importance",
    "label_rows",
    "learning_curves",
    "level_summary",
    "metric_by_parameter",
    "metric_histogram",
    "metric_vs_runtime",
    "outcome_model",
    "pair_rates",
    "pareto_front",
    "pruning_table",
    "runtime_by_level",
    "runtime_histogram",
    "state_counts",
    "top_configurations",
]
