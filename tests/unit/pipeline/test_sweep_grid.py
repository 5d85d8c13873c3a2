"""`rayalign sweep`'s grid, its refusals, its placement and its report's statistics (no Ray:
the end-to-end sweep is tests/integration/test_sweep.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import build_parser, main, parse_args
from pipeline.config import ConfigError, load_config, parse_overrides
from pipeline.evalstats import mean_ci, paired_diff_ci, seeded_diff_ci, seeded_mean_ci
from pipeline.preflight import with_absolute_paths
from pipeline.sweep import (
    Placement,
    SweepRun,
    expand,
    load_arms,
    parse_grid,
    split_values,
    waves,
)
from pipeline.sweep_report import collect, summarize


@pytest.fixture
def config(tmp_path, toy_world):
    raw = {"run_dir": str(tmp_path / "runs" / "base"),
           "model": {"policy": str(toy_world.model_dir)},
           "data": {"train": [str(toy_world.train_path)], "eval": [str(toy_world.eval_path)]},
           "loss": {"name": "sigmoid", "params": {"beta": 0.1}},
           "train": {"num_workers": 2, "cpus_per_worker": 0.5, "micro_batch_size": 4,
                     "global_batch_size": 16},
           "reward": {"kind": "function", "function": "pipeline.toy.reward:toy_gold_rewards"},
           "ray": {"num_cpus": 8}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_values_split_at_top_level_commas_only():
    assert split_values("a,b") == ["a", "b"]
    assert split_values("[0.9,0.99],[0.8,0.9]") == ["[0.9,0.99]", "[0.8,0.9]"]
    assert split_values("{beta: 0.1, target: auto},{beta: 1}") == ["{beta: 0.1, target: auto}",
                                                                  "{beta: 1}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_grid_separates_axes_from_fixed_overrides():
    fixed, axes = parse_grid(["loss.name=sigmoid,ipo", "train.learning_rate=1e-4",
                              "seed=0,1,2", "train.adam_betas=[0.9,0.99]"])
    assert fixed == {"train.learning_rate": 1e-4, "train.adam_betas": [0.9, 0.99]}
    assert [(a.key, a.values, a.is_seed) for a in axes] == [
        ("loss.name", ["sigmoid", "ipo"], False), ("seed", [0, 1, 2], True)]


@pytest.mark.parametrize("items, match", [
    (["loss.name=sigmoid,,ipo"], "an empty value"),
    (["loss.name="], "an empty value"),
    (["loss.name=sigmoid,sigmoid"], "given twice"),
    (["seed=0,1", "seed=2,3"], "given twice"),
    (["train.learning_rate=1e-4"], "nothing to sweep"),
    (["noequals"], "expected key.path=value"),
])
def test_bad_grids_are_refused(items, match):
    with pytest.raises(ConfigError, match=match):
        parse_grid(items)


def test_the_grid_expands_in_order_with_seeds_outside_the_arms(config, tmp_path):
    base, _axes, runs = expand(config, ["loss.name=sigmoid,ipo", "seed=0,1"], tmp_path / "sw")
    assert [r.name for r in runs] == ["00_name=sigmoid,seed=0", "01_name=sigmoid,seed=1",
                                      "02_name=ipo,seed=0", "03_name=ipo,seed=1"]
    assert [r.arm for r in runs] == ["name=sigmoid"] * 2 + ["name=ipo"] * 2
    r = runs[3]
    assert r.cfg.loss.name == "ipo" and r.cfg.run_dir == str(tmp_path / "sw" / r.name)
    # the run seed reseeds every seeded section
    assert (r.cfg.train.seed, r.cfg.sampling.seed, r.cfg.rounds.seed) == (1, 1, 1)
    # one reference cache for the whole sweep
    assert {x.cfg.reference.cache_dir for x in runs} == {str(tmp_path / "sw" / "cache" / "reference")}
    assert base.run_dir == str(tmp_path / "sw")
    # each run's command is `rayalign run` with its overrides, and reads back the same config
    argv = r.argv(config, "127.0.0.1:6379")
    assert argv[2:5] == ["pipeline.cli", "run", config] and argv[-2:] == ["--ray-address", "127.0.0.1:6379"]
    args = parse_args(build_parser(), argv[3:])
    again = load_config(args.config, parse_overrides(args.overrides, {"run_dir": args.run_dir}))
    assert again.model_dump() == r.cfg.model_dump()


def test_a_config_that_names_its_cache_keeps_it(config, tmp_path):
    _, _, runs = expand(config, ["loss.name=sigmoid,ipo", f"reference.cache_dir={tmp_path}/c"],
                        tmp_path / "sw")
    assert {r.cfg.reference.cache_dir for r in runs} == {f"{tmp_path}/c"}


def test_every_run_that_cannot_run_is_named_before_any_work(config, tmp_path):
    with pytest.raises(ConfigError, match="train.nope: unknown key") as err:
        expand(config, ["loss.name=sigmoid,ipo", "train.nope=1,2"], tmp_path / "sw")
    assert "4 of the grid's 4 runs" in str(err.value)
    # a loss whose needs the mode cannot meet: that run alone is named
    with pytest.raises(ConfigError) as err:
        expand(config, ["loss.name=sigmoid,sppo"], tmp_path / "sw")
    assert "1 of the grid's 2 runs" in str(err.value) and "01_name=sppo" in str(err.value)
    assert "win_rates" in str(err.value) and "00_name=sigmoid" not in str(err.value)


def test_runs_are_placed_side_by_side_as_far_as_the_cluster_holds(config, tmp_path):
    _, _, runs = expand(config, ["loss.name=sigmoid,ipo,simpo"], tmp_path / "sw")
    # a run holds reference 1 + policy 1 + trainer 2 × 0.5 + a CPU for Ray Data = 4 CPU
    assert waves(runs, [{"CPU": 8.0}], 3) == [[runs[0].name, runs[1].name], [runs[2].name]]
    assert waves(runs, [{"CPU": 8.0}], 1) == [[r.name] for r in runs]
    assert waves(runs, [{"CPU": 8.0}, {"CPU": 8.0}], 3) == [[r.name for r in runs]]
    place = Placement([{"CPU": 8.0}])
    a, b = place.reserve(runs[0].cfg), place.reserve(runs[1].cfg)
    assert a is not None and b is not None and place.reserve(runs[2].cfg) is None
    place.release(a)
    assert place.reserve(runs[2].cfg) is not None


def test_dry_run_prints_the_grid_and_placement_and_starts_nothing(config, tmp_path, capsys):
    rc = main(["sweep", config, "loss.name=sigmoid,ipo", "seed=0,1", "--dry-run",
               "--sweep-dir", str(tmp_path / "sw"), "--max-concurrent", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "4 runs = 2 loss.name × 2 seed" in out and "holds 4 CPU / 0 GPU" in out
    assert "together: 00_name=sigmoid,seed=0, 01_name=sigmoid,seed=1" in out
    assert "no problems found." in out
    assert not (tmp_path / "sw").exists()
    # a run that cannot be placed alone is a problem
    rc = main(["sweep", config, "loss.name=sigmoid,ipo", "ray.num_cpus=3", "--dry-run",
               "--sweep-dir", str(tmp_path / "sw")])
    out = capsys.readouterr().out
    assert rc == 1 and "problems:" in out and "run 00_name=sigmoid, 01_name=ipo:" in out


def test_seeded_intervals_reduce_to_the_paired_bootstrap_with_one_seed():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 40), rng.normal(0.3, 1, 40)
    assert seeded_mean_ci([x]) == mean_ci(x)
    d, p = seeded_diff_ci([y], [x]), paired_diff_ci(y, x)  # (mean y − mean x vs mean of y − x)
    assert (d.value, d.low, d.high) == pytest.approx((p.value, p.low, p.high), abs=1e-12)


def test_seeded_intervals_hold_the_spread_between_seeds():
    rng = np.random.default_rng(1)
    prompts = rng.normal(0, 0.1, 64)
    close = np.stack([prompts + 0.01 * s for s in range(3)])
    apart = np.stack([prompts + 1.0 * s for s in range(3)])
    assert seeded_mean_ci(apart).half_width > 10 * seeded_mean_ci(close).half_width
    # an arm shifted by 0.5 against another, on the same prompts: the paired difference is
    # exact and significant; the seed counts may differ
    d = seeded_diff_ci(close[:2] + 0.5, close)
    assert d.low > 0.4 and d.high < 0.6 and d.excludes(0.0)
    with pytest.raises(ValueError, match="different units"):
        seeded_diff_ci(close, close[:, :10])


def _finished_run(tmp_path, name, arm, gain, kl, loss="sigmoid"):
    """A run directory holding what the report reads: the eval row and the samples."""
    from pipeline.config import parse_config

    run_dir = tmp_path / name
    evaluate = run_dir / "round-0" / "evaluate"
    evaluate.mkdir(parents=True)
    prompts = [f"p{i}" for i in range(len(gain))]
    pq.write_table(pa.table({"prompt": prompts, "kl": kl, "gold_policy": gain,
                             "gold_reference": [0.0] * len(gain),
                             "win": [float(g > 0) + 0.5 * (g == 0) for g in gain]}),
                   evaluate / "samples.parquet")
    row = {"kind": "eval", "round": 0, "eval/rewards/margins": 0.2,
           **({"eval/principled/target_mean": 5.0} if loss == "principled" else {})}
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    cfg = parse_config({"run_dir": str(run_dir), "model": {"policy": "m"}, "data": {"train": ["x"]},
                        "loss": {"name": loss, "params": {"beta": 0.1}}})
    return SweepRun(name, {}, {}, cfg, arm, status="done")


def test_report_compares_each_arm_with_the_first_over_the_same_prompts(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(0.0, 0.05, 32)
    runs = [_finished_run(tmp_path, f"r{s}", "name=sigmoid", base + 0.01 * s, [0.1] * 32)
            for s in range(2)]
    runs += [_finished_run(tmp_path, f"q{s}", "name=principled", base + 0.2 + 0.01 * s,
                           [0.3] * 32, "principled") for s in range(2)]
    rows, notes = summarize([collect(r) for r in runs])
    assert [(r["arm"], r["seeds"]) for r in rows] == [("name=sigmoid", 2), ("name=principled", 2)]
    assert rows[1]["gain"].value == pytest.approx(base.mean() + 0.205)
    assert rows[1]["h"] == pytest.approx(2.0) and rows[1]["h_star"] == 5.0
    assert rows[0]["h_star"] is None
    assert len(notes) == 1 and notes[0].startswith(
        "name=principled vs name=sigmoid (32 prompts): gold gain +0.200 [")
    assert "(significant)" in notes[0]
    # the grid's first arm is the baseline; without results, nothing is compared
    rows, notes = summarize([collect(r) for r in runs[2:]], ["name=sigmoid", "name=principled"])
    assert [r["arm"] for r in rows] == ["name=principled"]
    assert notes == ["the first arm, name=sigmoid, has no results: no arm is compared"]


def test_report_keys_prompts_by_place_so_equal_texts_stay_apart(tmp_path):
    run = _finished_run(tmp_path, "r", "a", [0.1, 0.2, 0.3], [0.0] * 3)
    path = run.dir / "round-0" / "evaluate" / "samples.parquet"
    t = pq.read_table(path).to_pydict()
    t["prompt"] = ["same", "same", "other"]  # two multi-turn prompts ending in one turn
    pq.write_table(pa.table(t), path)
    assert len(collect(run).per_prompt["gain"]) == 3


def test_named_arms_carry_their_overrides_together(config, tmp_path):
    arms_file = tmp_path / "arms.yaml"
    arms_file.write_text(yaml.safe_dump({"arms": {
        "dpo": {"loss.name": "sigmoid", "loss.params": {"beta": 0.1}},
        "dpo-clean": {"loss.name": "sigmoid", "data.min_score_margin": 0},
        "ipo": {"loss.name": "ipo", "train.learning_rate": 3e-4}}}))
    arms = load_arms(arms_file)
    _, axes, runs = expand(config, ["seed=0,1"], tmp_path / "sw", arms=arms)
    assert [a.key for a in axes] == ["arm", "seed"]
    assert [r.name for r in runs][:3] == ["00_dpo,seed=0", "01_dpo,seed=1", "02_dpo-clean,seed=0"]
    assert [r.arm for r in runs] == ["dpo", "dpo", "dpo-clean", "dpo-clean", "ipo", "ipo"]
    clean, ipo = runs[2].cfg, runs[5].cfg
    assert clean.data.min_score_margin == 0 and runs[0].cfg.data.min_score_margin is None
    assert ipo.loss.name == "ipo" and ipo.train.learning_rate == 3e-4 and ipo.train.seed == 1
    # the run's command holds its arm's overrides: it is the same config again
    args = parse_args(build_parser(), runs[2].argv(config, None)[3:])
    again = load_config(args.config, parse_overrides(args.overrides, {"run_dir": args.run_dir}))
    assert again.model_dump() == clean.model_dump()
    # arms alone are a grid
    assert len(expand(config, [], tmp_path / "sw", arms=arms)[2]) == 3


@pytest.mark.parametrize("text, match", [
    ("arms: []", "expected `arms:"),
    ("nothing: 1", "expected `arms:"),
    ("arms: {'bad name': {loss.name: ipo}}", "a name of letters"),
    ("arms: {dpo: [loss.name]}", "expected a mapping"),
    ("arms: {dpo: {'loss..name': ipo}}", "expected key.path=value"),
])
def test_bad_arms_files_are_refused(tmp_path, text, match):
    path = tmp_path / "arms.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_arms(path)


def test_an_arm_with_a_bad_key_is_named(config, tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)run 01_ipo: .*loss.nope: unknown key"):
        expand(config, [], tmp_path / "sw", arms={"dpo": {"loss.name": "sigmoid"},
                                                  "ipo": {"loss.name": "ipo", "loss.nope": 1}})


def test_arm_picks_named_arms(config, tmp_path):
    arms = {"dpo": {"loss.name": "sigmoid"}, "ipo": {"loss.name": "ipo"},
            "simpo": {"loss.name": "simpo"}}
    _, _, runs = expand(config, ["arm=simpo,dpo"], tmp_path / "sw", arms=arms)
    assert [r.name for r in runs] == ["00_simpo", "01_dpo"]
    _, _, runs = expand(config, ["arm=ipo", "seed=0,1"], tmp_path / "sw", arms=arms)
    assert [r.name for r in runs] == ["00_ipo,seed=0", "01_ipo,seed=1"]
    with pytest.raises(ConfigError, match="no arm named kto"):
        expand(config, ["arm=dpo,kto"], tmp_path / "sw", arms=arms)
    with pytest.raises(ConfigError, match="picks named arms of an --arms file"):
        expand(config, ["arm=dpo,ipo"], tmp_path / "sw")


def _started(run, address="10.0.0.1:6379"):
    """The run directory `rayalign run` leaves (its config.yaml as pipeline.dag writes it)."""
    cfg = with_absolute_paths(run.cfg.model_copy(
        update={"ray": run.cfg.ray.model_copy(update={"address": address})}))
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"),
                                                        sort_keys=False))


def test_a_grown_grid_resumes_the_runs_it_already_has(config, tmp_path):
    """seed=1 → seed=1,2 and a new arm in front: the seed-1 runs keep their directories
    (their names had no seed and another index) instead of being renamed and recomputed."""
    arms = {"dpo": {"loss.name": "sigmoid"}, "ipo": {"loss.name": "ipo"},
            "simpo": {"loss.name": "simpo"}}
    sw = tmp_path / "sw"
    _, _, first = expand(config, ["arm=dpo,ipo", "seed=1"], sw, arms=arms)
    assert [r.name for r in first] == ["00_dpo", "01_ipo"]
    for run in first:
        _started(run)
    _, _, grown = expand(config, ["arm=simpo,dpo,ipo", "seed=1,2"], sw, arms=arms)
    assert [r.name for r in grown] == ["00_simpo,seed=1", "01_simpo,seed=2", "00_dpo",
                                       "03_dpo,seed=2", "01_ipo", "05_ipo,seed=2"]
    assert grown[2].cfg.run_dir == str(sw / "00_dpo") and grown[2].cfg.train.seed == 1
    args = parse_args(build_parser(), grown[4].argv(config, None)[3:])
    assert args.run_dir == str(sw / "01_ipo")
    # a run whose config changed is a new run: it gets a name of its own, the old is kept
    _, _, changed = expand(config, ["arm=dpo,ipo", "seed=1", "train.learning_rate=3e-4"], sw,
                           arms=arms)
    assert [r.name.split("-")[0] for r in changed] == ["00_dpo", "01_ipo"]
    assert all(r.name != o.name for r, o in zip(changed, first))
    assert all(r.cfg.train.learning_rate == 3e-4 and r.cfg.run_dir == str(sw / r.name)
               for r in changed)
    # on the cluster it joins (ray.*) a run is still the same run
    assert [r.name for r in expand(config, ["arm=dpo", "seed=1", "ray.num_cpus=6"], sw,
                                   arms=arms)[2]] == ["00_dpo"]


def test_each_run_is_checked_from_the_text_its_command_gets(config, tmp_path):
    """Values that YAML reads differently in a file and on a command line come out the same."""
    arms = load_arms(_arms_file(tmp_path, {"a": {"loss.params": {"beta": "1e-2"},
                                                 "train.adam_betas": [0.9, 0.99]}}))
    _, _, runs = expand(config, ["seed=0,1"], tmp_path / "sw", arms=arms)
    cfg = runs[0].cfg
    assert cfg.loss.params == {"beta": 0.01} and cfg.train.adam_betas == (0.9, 0.99)
    args = parse_args(build_parser(), runs[1].argv(config, None)[3:])
    again = load_config(args.config, parse_overrides(args.overrides, {"run_dir": args.run_dir}))
    assert again.model_dump() == runs[1].cfg.model_dump()


def _arms_file(tmp_path, arms):
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump({"arms": arms}))
    return path


def test_a_key_set_by_an_arm_and_the_command_line_is_refused(config, tmp_path):
    arms = {"a": {"loss.params": {"beta": 0.1}}, "b": {"loss.name": "ipo"}}
    with pytest.raises(ConfigError, match=r"loss.params \(arm a\)"):
        expand(config, ["loss.params.beta=0.2"], tmp_path / "sw", arms=arms)
    with pytest.raises(ConfigError, match=r"loss.name \(arm b\)"):
        expand(config, ["loss.name=sigmoid,ipo"], tmp_path / "sw", arms=arms)
    # arms with names YAML reads as numbers are picked by their text
    arms = {"1": {"loss.name": "sigmoid"}, "2": {"loss.name": "ipo"}}
    assert [r.name for r in expand(config, ["arm=2"], tmp_path / "sw", arms=arms)[2]] == ["00_2"]


def test_the_cluster_cannot_differ_between_runs(config, tmp_path):
    with pytest.raises(ConfigError, match="ray.num_cpus cannot differ between runs"):
        expand(config, ["ray.num_cpus=8,16"], tmp_path / "sw")


def test_a_big_run_does_not_hold_up_smaller_ones_behind_it(config, tmp_path):
    arms = {"small": {"train.num_workers": 2}, "big": {"train.num_workers": 8},
            "small-ipo": {"train.num_workers": 2, "loss.name": "ipo"}}
    _, _, runs = expand(config, ["train.global_batch_size=32"], tmp_path / "sw", arms=arms)
    # 4, 7 and 4 CPUs on 8: the third starts beside the first, the second after them
    assert waves(runs, [{"CPU": 8.0}], 3) == [[runs[0].name, runs[2].name], [runs[1].name]]


def test_an_interrupted_sweep_stops_its_runs_and_kills_one_that_will_not(monkeypatch, config,
                                                                        tmp_path):
    import signal
    import subprocess
    import sys

    from pipeline import sweep

    monkeypatch.setattr(sweep, "STOP_WAIT_S", 5.0)
    _, _, runs = expand(config, ["loss.name=sigmoid,ipo"], tmp_path / "sw")
    ready = "print('ready', flush=True); time.sleep(60)"
    # the sweep ignores SIGINT, as one started in the background does: its runs must not
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        polite = sweep.interruptible([sys.executable, "-c", f"import time; {ready}"],
                                     stdout=subprocess.PIPE, text=True)
        ignore = f"import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); {ready}"
        stubborn = sweep.interruptible([sys.executable, "-c", ignore],
                                       stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    # each has its SIGINT handling in place (a loaded machine can take seconds to get there)
    assert polite.stdout.readline() == "ready\n" and stubborn.stdout.readline() == "ready\n"
    sweep._stop({"a": (runs[0], polite, 0.0), "b": (runs[1], stubborn, 0.0)})
    assert polite.returncode not in (None, -9) and stubborn.returncode == -9
    assert [r.status for r in runs] == ["interrupted", "interrupted"]


def test_report_tables_online_runs_by_round_with_the_pairs_each_trained_on(tmp_path):
    from pipeline.manifest import MANIFEST, Manifest, write_json_atomic
    from pipeline.sweep_report import by_round

    runs = [_finished_run(tmp_path, f"r{s}", "name=sigmoid", [0.1, 0.3], [0.2, 0.4]) for s in (0, 1)]
    for s, run in enumerate(runs):
        run.cfg.rounds.count = 2  # as an online config has it
        rows = [{"kind": "eval", "round": k, "eval/gold_gain": 0.1 * k + 0.01 * s,
                 "eval/win_rate": 0.5, "eval/kl": 1.0 + k, "eval/len_policy": 10.0 + k}
                for k in range(3)]  # round 2: left from an earlier, longer run
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for k in range(2):
            train = run.dir / f"round-{k}" / "train"
            train.mkdir(parents=True)
            write_json_atomic(train / MANIFEST, Manifest("train", "k", {}, {
                "trained_pairs": 30 + 2 * s + k, "num_pairs": 99}, 1.0, 0.0).__dict__)
    assert by_round(runs) == [["name=sigmoid", "0", "2", "31", "0.005", "0.500", "1.000", "10.0"],
                              ["name=sigmoid", "1", "2", "32", "0.105", "0.500", "2.000", "11.0"]]
    runs[0].cfg.rounds.count = runs[1].cfg.rounds.count = 1  # one round each: no table
    assert by_round(runs) == []


def test_report_reads_the_training_gap_half_way_and_at_the_end(tmp_path):
    run = _finished_run(tmp_path, "r", "a", [0.1, 0.2], [0.0, 0.0])
    rows = [{"kind": "train", "round": 0, "step": s, "rewards/margins": 0.1 * s} for s in range(1, 6)]
    rows.append({"kind": "train", "round": 0, "step": 5, "rewards/margins": 0.8})  # redone after a resume
    with (run.dir / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = collect(run).metrics
    assert metrics["train/h_half"] == pytest.approx(3.0) and metrics["train/h_end"] == pytest.approx(8.0)
    row = summarize([collect(run)])[0][0]
    assert row["h train end"] == pytest.approx(8.0)
