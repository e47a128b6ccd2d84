"""Random-forest functional ANOVA puts the planted effects first and the null parameter last."""
from gridrunner.analysis.importance import importance

from analysis_grids import planted_grid


def test_planted_parameters_explain_the_variance_and_the_null_one_does_not():
    table = importance(planted_grid(seed=2))
    shares = table.set_index("effect")["variance_share"]
    assert table.iloc[0]["effect"] == "x"
    # truth (variance over the grid): x 66 %, depth 25 %, loss 8 %, z 0
    assert shares["x"] > 0.5 and shares["depth"] > 0.1 and shares["loss"] > 0.02
    assert shares["z"] < 0.02 and shares["z"] < shares["loss"]
    assert shares.sum() <= 1.0 + 1e-9
    assert "RandomForestRegressor" in table.attrs["method"] and "functional ANOVA" in table.attrs["method"]
    assert set(table["kind"]) == {"main", "pair"}


def test_large_grids_of_levels_are_sampled_and_said_so(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["gridrunner.analysis.importance"], "MAX_CELLS", 10)  # the package re-exports a function of that name
    table = importance(planted_grid(seed=2))
    assert table.iloc[0]["effect"] == "x"
    assert any("partial dependence" in note for note in table.attrs["notes"])


def test_too_few_rows_gives_a_note_not_an_error():
    frame = planted_grid().head(5)
    table = importance(frame)
    assert table.empty and "at least 10 successful rows" in table.attrs["notes"][0]
