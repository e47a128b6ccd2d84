"""The report: files written, images that exist, machine-readable model tables, a one-screen summary."""
import re

import pandas as pd
import pytest

import gridrunner
from gridrunner.analysis.report import build_report

from analysis_grids import study_grid, write_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study_report(tmp_path_factory):
    """The study-like grid written as real shards (with spaces in the path), loaded by gridrunner.load."""
    root = tmp_path_factory.mktemp("runs with 'quotes' and spaces")
    grid_dir = write_grid(root, study_grid())
    df = gridrunner.load(grid_dir)
    return build_report(df, grid_dir / "report", metric="m_ssim", top=15)


def test_html_references_only_images_that_exist_as_png(study_report):
    page = study_report.html_path.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 8
    for name in images:
        data = (study_report.out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    for name in re.findall(r'href="([^"]+\.csv)"', page):
        assert (study_report.out_dir / name).exists(), name


def test_markdown_mirrors_the_html(study_report):
    text = study_report.markdown_path.read_text()
    for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (study_report.out_dir / name).stat().st_size > 0
    assert "## Failure model" in text and "every failure has loss=ssim" in text


@pytest.mark.parametrize("name", ["outcome_model.csv", "failure_model.csv"])
def test_model_tables_have_one_row_per_term_and_fixed_columns(study_report, name):
    table = pd.read_csv(study_report.out_dir / name)
    assert list(table.columns) == ["term", "estimate", "ci_low", "ci_high", "p_value"]
    assert table["term"].is_unique and len(table) >= 5
    assert (table["ci_low"] <= table["estimate"]).all() and (table["estimate"] <= table["ci_high"]).all()


def test_report_states_grid_rule_versions_and_time(study_report):
    page = study_report.html_path.read_text()
    assert "Grid dncnn" in page and "m_ssim &lt; 0.5 or m_mae &gt; 1" in page
    assert re.search(r"Made \d{4}-\d\d-\d\d \d\d:\d\d UTC with python 3\.\d+", page)
    for package in ("statsmodels", "scikit-learn", "matplotlib", "pandas"):
        assert package in page


def test_every_table_is_a_csv(study_report):
    names = {path.name for path in study_report.files}
    expected = {"counts", "outcome_model", "outcome_anova", "failure_model", "failure_firth_logit", "failure_lpm",
                "failure_term_tests", "failure_rates", "failure_interactions", "failure_pair_loss_skip", "importance",
                "top", "levels", "runtime"}
    assert {f"{name}.csv" for name in expected} <= names
    assert len(pd.read_csv(study_report.out_dir / "top.csv")) == 15


def test_summary_fits_one_screen_and_names_the_key_findings(study_report):
    text = study_report.summary_text()
    lines = text.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 100
    assert "every failure has loss=ssim" in text
    assert "Top 5 by m_ssim (highest first)" in text
    assert "loss × skip" in text


def test_learning_curves_are_drawn_from_logged_history(study_report):
    # With histories present the figure has curves, so it is larger than the "no history" placeholder.
    assert (study_report.out_dir / "learning_curves.png").stat().st_size > 10_000


def test_report_can_be_rebuilt_in_place(study_report):
    again = build_report(gridrunner.load(study_report.out_dir.parent), study_report.out_dir, metric="m_ssim")
    assert again.html_path == study_report.html_path and again.html_path.exists()
