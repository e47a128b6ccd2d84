"""Real TensorFlow training of the MRI tasks: every loss and skip scheme, resume, determinism, failures.

Rows run at 32 x 32 for a few dozen steps on one thread (see conftest.py), in this process:
the tasks are called as a worker calls them, ``run(params, ctx)``, with a real Context.
"""
from __future__ import annotations

import json
import math

import pytest

from gridrunner.context import Context
from gridrunner.errors import Interrupted
from gridrunner.grid import make
from gridrunner.tasks import dncnn, unet
from gridrunner.tasks.mri import losses, training

MAIN_METRICS = ("m_mae", "m_mse", "m_ssim", "bench_mae", "bench_mse", "bench_ssim")


def dncnn_row(small_row, **changes):
    return {**small_row, "depth": 2, "filters": 8, "batch_size": 4, "steps": 20, "bn_momentum": 0.9, **changes}


@pytest.mark.parametrize("skip", ["dncnn", "resnet"])
@pytest.mark.parametrize("loss", losses.LOSSES)
def test_twenty_steps_of_every_loss_and_skip_scheme_give_finite_metrics(tmp_path, small_row, loss, skip):
    ctx = Context(tmp_path / "rows" / "r1")
    metrics = dncnn.run(dncnn_row(small_row, loss=loss, skip=skip), ctx)
    assert all(math.isfinite(metrics[name]) for name in MAIN_METRICS), metrics
    assert -1 <= metrics["m_ssim"] <= 1 and metrics["steps_run"] == 20
    history = ctx.history()
    assert history[-1]["step"] == 20 and all(math.isfinite(point["loss"]) for point in history)
    assert json.loads((ctx.row_dir / training.METRICS_FILE).read_text())["m_ssim"] == metrics["m_ssim"]


def test_a_stopped_row_resumes_at_its_checkpoint_step(tmp_path, small_row):
    row = dncnn_row(small_row, steps=30, checkpoint_every=10)
    stops = iter([False] * 15 + [True])  # asked to stop before step 15
    ctx = Context(tmp_path / "rows" / "r1", should_stop=lambda: next(stops, True))
    with pytest.raises(Interrupted, match="stopped at step 15 of 30"):
        dncnn.run(row, ctx)
    assert [point["step"] for point in ctx.history()] == list(range(1, 16))

    again = Context(tmp_path / "rows" / "r1")
    metrics = dncnn.run(row, again)
    assert metrics["resumed_from"] == 15 and metrics["steps_run"] == 15
    steps = [point["step"] for point in again.history()]
    assert steps[:15] == list(range(1, 16)) and steps[15:] == list(range(16, 31))  # continued, not restarted


def test_a_resumed_run_trains_exactly_like_an_uninterrupted_one(tmp_path, small_row):
    row = dncnn_row(small_row, steps=24, checkpoint_every=6, seed=3)
    straight = dncnn.run(row, Context(tmp_path / "rows" / "straight"))
    stops = iter([False] * 12 + [True])
    ctx = Context(tmp_path / "rows" / "resumed", should_stop=lambda: next(stops, True))
    with pytest.raises(Interrupted):
        dncnn.run(row, ctx)
    resumed = dncnn.run(row, Context(tmp_path / "rows" / "resumed"))
    assert resumed["resumed_from"] == 12
    for name in MAIN_METRICS:
        assert resumed[name] == pytest.approx(straight[name], rel=1e-5), name


def test_two_runs_with_the_same_seed_give_identical_metrics(tmp_path, small_row):
    row = dncnn_row(small_row, seed=11, steps=15)
    first = dncnn.run(row, Context(tmp_path / "rows" / "a"))
    second = dncnn.run(row, Context(tmp_path / "rows" / "b"))
    assert {k: first[k] for k in MAIN_METRICS} == {k: second[k] for k in MAIN_METRICS}
    other = dncnn.run({**row, "seed": 12}, Context(tmp_path / "rows" / "c"))
    assert other["m_mae"] != first["m_mae"]


def test_a_unet_trains_and_reports_the_benchmark(tmp_path, small_row):
    row = {**small_row, "filters": [8, 16, 8], "reps": [1, 1, 1], "batch": 4, "steps": 10, "lossflavour": "ms_ssim"}
    metrics = unet.run(row, Context(tmp_path / "rows" / "u"))
    assert all(math.isfinite(metrics[name]) for name in MAIN_METRICS)
    assert metrics["bench_ssim"] < 1


def test_a_loss_that_diverges_ends_the_row_with_its_step(tmp_path, small_row):
    # An absurd learning rate makes the weights overflow within a few steps.
    row = dncnn_row(small_row, loss="l2", learning_rate=1e30, steps=50, skip="none")
    with pytest.raises(FloatingPointError, match=r"(loss became (nan|inf) at step \d+)|non-finite"):
        dncnn.run(row, Context(tmp_path / "rows" / "nan"))


def test_impossible_models_fail_in_the_worker_before_any_training(tmp_path, small_row):
    # A U-Net whose lists differ in length is recorded as the row's failure, with a clear message.
    spec = tmp_path / "bad.yaml"
    spec.write_text(json.dumps({
        "task": "unet", "outcomes": list(MAIN_METRICS),
        "grid": {"filters": [[8, 8, 8]], "reps": [[1, 1]]}, "fixed": {**small_row, "steps": 1},
    }))
    grid = make(spec, tmp_path / "runs").grid_dir
    from gridrunner.worker import Worker

    summary = Worker(grid, inline=True, linger=False, handle_signals=False).run()
    assert summary.failed == 1
    (shard,) = (grid / "shards").glob("*.csv")
    text = shard.read_text()
    assert "ValueError: " in text and "filters and reps" in text


def test_the_validation_metric_changes_neither_the_trained_model_nor_the_final_metrics(tmp_path, small_row):
    row = dncnn_row(small_row, loss="ssim", steps=20, seed=5)
    without = dncnn.run({**row, "eval_every": 0}, Context(tmp_path / "rows" / "off"))
    ctx = Context(tmp_path / "rows" / "on")
    with_it = dncnn.run({**row, "eval_every": 4, "eval_images": 6}, ctx)
    for name in MAIN_METRICS + ("train_loss",):
        assert with_it[name] == without[name], name
    points = [point for point in ctx.history() if "val_ssim" in point]
    assert [point["step"] for point in points] == [4, 8, 12, 16, 20]
    assert all(-1 <= point["val_ssim"] <= 1 and point["val_mae"] >= 0 for point in points)
    assert with_it["eval_s"] > 0 and without["eval_s"] == 0
    for k, point in enumerate(points):  # the best so far, for rules that one noisy validation must not fire
        assert point["val_ssim_best"] == max(p["val_ssim"] for p in points[:k + 1])
        assert point["val_mae_best"] == min(p["val_mae"] for p in points[:k + 1])
        assert_best_steps(points[:k + 1])


def assert_best_steps(points):
    """The last point's ``*_best_step`` is the step of the first validation that reached its best."""
    last = points[-1]
    assert last["val_ssim_best_step"] == next(p["step"] for p in points if p["val_ssim"] == last["val_ssim_best"])
    assert last["val_mae_best_step"] == next(p["step"] for p in points if p["val_mae"] == last["val_mae_best"])


def test_a_resumed_row_goes_on_from_the_best_validation_of_the_steps_its_checkpoint_kept(tmp_path, small_row):
    row = dncnn_row(small_row, loss="ssim", steps=24, checkpoint_every=8, eval_every=4, eval_images=6, seed=2)
    stops = iter([False] * 14 + [True])  # stopped before step 15: it checkpoints at step 14
    ctx = Context(tmp_path / "rows" / "r1", should_stop=lambda: next(stops, True))
    with pytest.raises(Interrupted):
        dncnn.run(row, ctx)
    assert dncnn.run(row, Context(tmp_path / "rows" / "r1"))["resumed_from"] == 14
    points = [p for p in ctx.history() if "val_ssim" in p]
    assert [p["step"] for p in points] == [4, 8, 12, 16, 20, 24]
    for k, point in enumerate(points):  # the resumed run's bests include the first run's validations
        assert point["val_ssim_best"] == max(p["val_ssim"] for p in points[:k + 1])
        assert_best_steps(points[:k + 1])
    # Records past the checkpoint are of a run that was lost (killed after step 8, say): left out.
    assert training.best_so_far([{"step": 4, "val_ssim": 0.2, "val_mae": 0.3}, {"step": 12, "val_ssim": 0.9,
                                 "val_mae": 0.1}], 8) == {"val_ssim_best": 0.2, "val_mae_best": 0.3,
                                                          "val_ssim_best_step": 4, "val_mae_best_step": 4}


def test_the_step_of_the_best_moves_only_when_a_validation_improves_on_it():
    history = [{"step": 40, "val_ssim": 0.3, "val_mae": 0.2}, {"step": 80, "val_ssim": 0.3, "val_mae": 0.25},
               {"step": 120, "val_ssim": 0.1, "val_mae": 0.1}, {"step": 160, "val_ssim": 0.4, "val_mae": 0.1}]
    assert training.best_so_far(history, 160) == {"val_ssim_best": 0.4, "val_ssim_best_step": 160,
                                                  "val_mae_best": 0.1, "val_mae_best_step": 120}
    # a tie is no improvement: the rule `step - val_ssim_best_step >= 40` fires at step 80 on a flat curve
    assert training.best_so_far(history, 80)["val_ssim_best_step"] == 40
    assert training.best_so_far(history, 80)["val_mae_best_step"] == 40


def test_the_validation_images_are_fixed_by_the_data_alone(small_row):
    # validation_batch takes the test split and a count, nothing of the row's loss, model or seed.
    cache = training.dataset.cache_folder(small_row["cache_dir"])
    test = training.dataset.load_pairs(training.dataset.DataConfig.from_params(small_row), "test", cache)[0]
    chosen = training.validation_batch(test, 16)
    assert len(chosen) == min(16, len(test)) and set(chosen.source) <= set(test.source)
    again = training.validation_batch(test, 16)
    assert (again.x == chosen.x).all()


@pytest.mark.parametrize("bad", [-1, 1.5, "often", True])
def test_a_bad_eval_every_fails_the_row_before_training(small_row, bad):
    with pytest.raises(ValueError, match="eval_every"):
        training.split_params({**small_row, "eval_every": bad}, dncnn.MODEL_DEFAULTS)


def test_a_prune_rule_on_the_validation_metric_stops_the_row_at_that_step_with_its_checkpoint(tmp_path, small_row):
    row = dncnn_row(small_row, steps=20, eval_every=4, checkpoint_every=100)
    ctx = Context(tmp_path / "rows" / "r1")
    ctx.watch_prune(["step >= 8 and val_ssim < 2"], row)  # val_ssim is at most 1: matches at its first point >= 8
    with pytest.raises(Interrupted, match="stopped at step 8 of 20"):
        dncnn.run(row, ctx)
    assert ctx.pruned == "Pruned: step >= 8 and val_ssim < 2 at step 8"
    resumed = dncnn.run(row, Context(tmp_path / "rows" / "r1"))  # the checkpoint the stop saved
    assert resumed["resumed_from"] == 8
