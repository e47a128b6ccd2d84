"""Learning curves on one scale: a panel per loss, or the validation metric every row shares on one axis."""
import json

import gridrunner
from gridrunner.analysis.plots import learning_curves

from analysis_grids import study_grid, write_grid


def drawn(fig):
    """(panel title, y label, number of lines) for each panel that has curves."""
    return [(ax.get_title(), ax.get_ylabel(), len(ax.get_lines())) for ax in fig.axes if ax.get_lines()]


def test_training_losses_are_drawn_in_one_panel_per_loss(tmp_path):
    df = gridrunner.load(write_grid(tmp_path, study_grid()))
    panels = drawn(learning_curves(df, "m_ssim", n=3))
    assert [title for title, _, _ in panels] == ["loss=l1", "loss=l2", "loss=ssim"]
    assert all(label == "loss" and 1 <= lines <= 6 for _, label, lines in panels)


def test_a_validation_metric_every_row_logs_is_drawn_on_one_axis(tmp_path):
    grid_dir = write_grid(tmp_path, study_grid())
    for history in (grid_dir / "rows").glob("*/history.jsonl"):
        records = [json.loads(line) for line in history.read_text().splitlines()]
        history.write_text("".join(json.dumps({**r, "val_ssim": 0.5 + r["step"] / 1000, "val_mae": 0.1}) + "\n" for r in records))
    fig = learning_curves(gridrunner.load(grid_dir), "m_ssim", n=3)
    panels = drawn(fig)
    assert len(panels) == 1 and panels[0][1] == "val_ssim" and panels[0][2] == 6
    assert "val_ssim, which every row logs on one scale" in fig._suptitle.get_text()
