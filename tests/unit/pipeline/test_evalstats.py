"""pipeline.evalstats: bootstrap intervals against hand-computed and normal-theory values."""

import numpy as np
import pytest

from pipeline.evalstats import (
    Interval,
    mean_ci,
    paired_by_key,
    paired_diff_ci,
    unit_keys,
    win_rate_ci,
    wins,
)


def test_constant_sample_has_a_zero_width_interval():
    assert mean_ci([0.75] * 20) == Interval(0.75, 0.75, 0.75)


def test_two_points_interval_is_their_range():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5%
    # and 97.5% percentiles are 0 and 1
    ci = mean_ci([0.0, 1.0])
    assert (ci.value, ci.low, ci.high) == (0.5, 0.0, 1.0)
    assert ci.half_width == 0.5


def test_interval_matches_normal_theory_on_a_large_sample():
    x = np.random.default_rng(1).normal(2.0, 3.0, size=900)
    ci = mean_ci(x)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert ci.value == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * se)
    assert ci.high == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * se)


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = sum(not mean_ci(rng.normal(0.0, 1.0, size=60), resamples=1000, seed=s).excludes(0.0)
                  for s in range(300))
    assert 0.90 <= covered / 300 <= 0.985


def test_seeded_reproducible_and_seed_matters():
    x = np.random.default_rng(3).normal(size=40)
    assert mean_ci(x, seed=5) == mean_ci(x, seed=5)
    assert mean_ci(x, seed=5) != mean_ci(x, seed=6)


def test_paired_difference_removes_the_shared_noise():
    rng = np.random.default_rng(4)
    prompt_effect = rng.normal(0.0, 5.0, size=64)  # prompts differ a lot
    ref = prompt_effect + rng.normal(0.0, 0.1, size=64)
    pol = prompt_effect + 0.3 + rng.normal(0.0, 0.1, size=64)
    paired = paired_diff_ci(pol, ref)
    assert paired.excludes(0.0) and paired.low > 0.2 and paired.high < 0.4
    # each mean's own interval is much wider than the gain: unpaired, no conclusion
    assert mean_ci(pol).half_width > 5 * paired.half_width
    exact = paired_diff_ci([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert exact == Interval(-1.0, -1.0, -1.0)


def test_wins_count_ties_half_and_win_rate_interval():
    assert wins([1, 2, 3], [1, 1, 4]).tolist() == [0.5, 1.0, 0.0]
    assert win_rate_ci([2] * 10, [1] * 10) == Interval(1.0, 1.0, 1.0)
    coin = win_rate_ci([1, 0] * 50, [0, 1] * 50)
    assert coin.value == 0.5 and not coin.excludes(0.5)


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="differ in size"):
        paired_diff_ci([1.0, 2.0], [1.0])


def test_paired_by_key_keeps_common_keys_in_order():
    assert paired_by_key({"a": 1, "b": 2, "c": 3}, {"c": 30, "a": 10, "d": 40}) == ([3, 1], [30, 10])


def test_as_metrics_is_flat():
    assert Interval(1.0, 0.5, 1.5).as_metrics("eval/kl") == {
        "eval/kl": 1.0, "eval/kl_low": 0.5, "eval/kl_high": 1.5}


def test_prompt_metrics_pair_the_gold_rewards():
    from pipeline.stages.evaluate import prompt_metrics

    gp, gr = np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.5, 0.8, 0.1, 0.3])
    m = prompt_metrics(np.array([0.1, 0.2, 0.3, 0.4]), gp, gr)
    assert m["eval/gold_gain"] == pytest.approx(0.225)  # (0.4 + 0 + 0.6 − 0.1) / 4
    assert m["eval/win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["eval/kl"] == pytest.approx(0.25)
    for key in ("eval/gold_gain", "eval/win_rate", "eval/kl", "eval/gold_policy", "eval/gold_reference"):
        assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"]
    assert set(prompt_metrics(np.array([0.1]))) == {"eval/kl", "eval/kl_low", "eval/kl_high"}


def test_eval_plot_draws_the_intervals(tmp_path):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from pipeline import metrics

    rows = [{"kind": "eval", "round": k, "eval/gold_gain": g, "eval/gold_gain_low": g - 0.1,
             "eval/gold_gain_high": g + 0.2, "eval/kl": 0.1} for k, g in enumerate([0.05, 0.3])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    real = plt.Axes.errorbar
    plt.Axes.errorbar = lambda ax, x, y, yerr=None, **kw: drawn.append((list(y), yerr)) or real(
        ax, x, y, yerr=yerr, **kw)
    try:
        written = metrics.plot_run(tmp_path)
    finally:
        plt.Axes.errorbar = real
    assert (tmp_path / "plots" / "eval.png") in written
    gain = next(d for d in drawn if d[0] == [0.05, 0.3])
    assert np.allclose(gain[1], [[0.1, 0.1], [0.2, 0.2]])
    kl = next(d for d in drawn if d[0] == [0.1, 0.1])
    assert np.allclose(kl[1], 0.0)  # no interval recorded: no bar


def test_shared_metric_functions():
    """The per-unit metrics evaluate, pairing and bench/ share (pipeline.evalstats)."""
    import numpy as np

    from pipeline.evalstats import pair_outcomes, sequence_kl, win_rates, wins

    assert win_rates([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5]
    assert win_rates([1.0]) == [0.5] and win_rates([]) == []
    assert wins([1.0, 2.0, 2.0], [2.0, 1.0, 2.0]).tolist() == [0.0, 1.0, 0.5]
    assert sequence_kl([-3.0, -1.0], [-4.0, -1.5]).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="differ in size"):
        sequence_kl([-3.0], [-4.0, -1.5])
    out = pair_outcomes([0.2, -0.1], [0.1, 0.3], [-5.0, -9.0], [-6.0, -7.0], [-5.5, -8.0],
                        [-5.0, -8.5])
    assert np.allclose(out["margin"], [0.1, -0.4])
    assert out["reward_accuracy"].tolist() == [1.0, 0.0]
    assert out["ranking"].tolist() == [1.0, 0.0] and out["ref_ranking"].tolist() == [0.0, 1.0]


def test_prompts_that_end_in_the_same_text_stay_apart_between_rounds(tmp_path):
    """Two multi-turn eval prompts ending in the same question are two units: the summary's
    round-vs-round comparison (pipeline.dag._units) pairs each with itself, not one with the
    other's value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dag import Round, _units

    values = {}
    for k, gains in ((0, [0.1, 0.9, 0.5]), (1, [0.2, 1.0, 0.6])):
        out = tmp_path / f"round-{k}" / "evaluate"
        out.mkdir(parents=True)
        pq.write_table(pa.table({"prompt": ["List three fruits.", "List three fruits.", "Hi"],
                                 "win": gains}), out / "samples.parquet")
        r = Round(cfg=None, run_dir=tmp_path, index=k, policy_path="", reference_path="", env={})
        values[k] = _units(r, "samples", "win")
    assert len(values[0]) == 3
    before, now = paired_by_key(values[0], values[1])
    assert np.allclose(np.subtract(now, before), 0.1)
    assert unit_keys("pairs", {"id": ["a", "b"]}) == ["a", "b"]
