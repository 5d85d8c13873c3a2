"""Placement plan: units packed onto nodes, custom resources, trainer placement strategies."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.plan import Resources, StagePlan, check_plan, format_plan, stage_plans, units_per_node

BASE = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"]},
        "loss": {"name": "sigmoid", "params": {"beta": 0.1}},
        "train": {"num_workers": 2, "micro_batch_size": 1, "global_batch_size": 2}}


def config(**sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_config(raw)


def two_nodes(head_cpus=2.0, worker_cpus=2.0, gpus=0.0):
    return Resources([{"CPU": head_cpus, "head_node": 100.0, "node:127.0.0.1": 1.0},
                      {"CPU": worker_cpus, "GPU": gpus, "worker_node": 100.0}], "test cluster")


def train_plan(cfg):
    return next(p for p in stage_plans(cfg) if p.stage == "train")


def test_custom_resources_reach_the_plan():
    cfg = config(train={"resources": {"worker_node": 0.5}, "placement_strategy": "SPREAD"},
                 reference={"resources": {"head_node": 1}})
    plans = {p.stage: p for p in stage_plans(cfg)}
    assert plans["train"].demand() == {"CPU": 0.5, "worker_node": 0.5}
    assert plans["train"].strategy == "SPREAD"
    assert plans["reference"].demand() == {"CPU": 1, "head_node": 1}
    text = format_plan(list(plans.values()), two_nodes())
    assert "worker_node 0.5" in text and "SPREAD" in text and "in 2 node(s)" in text
    assert "node:127.0.0.1" not in text  # Ray's bookkeeping resources are not shown


def test_units_per_node_takes_the_scarcest_resource():
    assert units_per_node({"CPU": 0.5, "worker_node": 40}, {"CPU": 2, "worker_node": 100}) == 2
    assert units_per_node({"CPU": 0.5}, {"CPU": 2}) == 4
    assert units_per_node({"GPU": 1}, {"CPU": 8}) == 0


def test_fitting_config_has_no_problems():
    cfg = config(train={"resources": {"worker_node": 1}}, reference={"resources": {"head_node": 1}},
                 sampling={"resources": {"head_node": 1}})
    assert check_plan(stage_plans(cfg), two_nodes()) == []


def test_missing_custom_resource_is_named():
    cfg = config(train={"resources": {"gpu_node": 0.01}})
    [problem] = check_plan(stage_plans(cfg), two_nodes())
    assert problem.startswith("stage 'train' needs 1 CPU / 0 GPU + gpu_node 0.02")
    assert "no node has the custom resource(s) 'gpu_node'" in problem
    assert "test cluster has 4 CPU / 0 GPU in 2 node(s)" in problem


def test_unit_larger_than_any_node_is_refused_even_if_the_total_fits():
    cfg = config(reference={"cpus_per_actor": 3})
    [problem] = check_plan(stage_plans(cfg), two_nodes())  # 4 CPUs in all, 2 per node
    assert "stage 'reference'" in problem and "no single node can hold one unit" in problem


@pytest.mark.parametrize("strategy, ok", [("PACK", True), ("SPREAD", True),
                                          ("STRICT_PACK", False), ("STRICT_SPREAD", True)])
def test_strategy_counts(strategy, ok):
    # two workers of 2 CPUs: one per node fits (a third CPU on one node is left for Ray
    # Data's tasks); both on one node does not
    cfg = config(train={"cpus_per_worker": 2, "placement_strategy": strategy})
    problems = check_plan([train_plan(cfg)], two_nodes(head_cpus=3.0))
    assert (problems == []) is ok, problems
    if not ok:
        assert "STRICT_PACK needs one node for all 2; the best fits 1" in problems[0]


def test_strict_spread_needs_distinct_nodes():
    cfg = config(train={"cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD",
                        "num_workers": 3, "global_batch_size": 3})
    [problem] = check_plan([train_plan(cfg)], two_nodes())
    assert "STRICT_SPREAD needs 3 distinct nodes; 2 can hold one" in problem


def test_more_units_than_the_nodes_hold():
    plan = StagePlan("evaluate", "engines", 5, 1, 0)
    [problem] = check_plan([plan], two_nodes())
    assert "the nodes can hold 4 of the 5 units at once" in problem


def test_local_custom_resources_count_for_a_local_run():
    from pipeline.plan import local_resources

    cfg = config(train={"resources": {"trainer": 1}}, ray={"num_cpus": 4, "resources": {"trainer": 2}})
    assert check_plan(stage_plans(cfg), local_resources(cfg)) == []


@pytest.mark.parametrize("bad", [{"CPU": 1}, {"GPU": 1}, {"gpu_node": 0}, {"x": -1}])
def test_config_rejects_non_custom_or_non_positive_resources(bad):
    with pytest.raises(ConfigError, match="train.resources"):
        config(train={"resources": bad})


def test_reward_pool_reaches_the_plan_and_the_score_stage():
    """reward.num_actors / cpus_per_actor / gpus_per_actor / resources are the score stage's
    units in the plan, and the same numbers are what run_score asks Ray Data for."""
    from pipeline.stages.score import pool_map_args

    reward = {"kind": "function", "function": "m:f", "num_actors": 3, "cpus_per_actor": 2,
              "gpus_per_actor": 0.5, "resources": {"gpu_node": 1}, "batch_size": 7}
    cfg = config(rounds={"mode": "online", "count": 2}, reward=reward)
    score = next(p for p in stage_plans(cfg) if p.stage == "score")
    assert (score.units, score.cpus_each, score.gpus_each) == (3, 2, 0.5)
    assert score.demand() == {"CPU": 2, "GPU": 0.5, "gpu_node": 1}
    assert "reward function tasks" in format_plan(stage_plans(cfg), two_nodes(gpus=2))
    [problem] = check_plan([score], two_nodes(gpus=2))  # no node has gpu_node
    assert problem.startswith("stage 'score' needs 6 CPU / 1.5 GPU + gpu_node 3")
    from ray.data import TaskPoolStrategy

    assert pool_map_args(cfg.reward) == {"compute": TaskPoolStrategy(size=3), "num_cpus": 2,
                                         "num_gpus": 0.5, "batch_size": 7,
                                         "resources": {"gpu_node": 1}}


def test_engines_and_trainers_hold_their_share_for_the_run():
    """The engine pools and the trainer's workers live for the run: every other stage must
    fit beside them, with a CPU left for Ray Data's tasks (which otherwise wait forever
    without an error)."""
    cfg = config(train={"cpus_per_worker": 0.5}, reference={"cpus_per_actor": 1},
                 sampling={"cpus_per_actor": 1}, rounds={"mode": "online", "count": 2},
                 reward={"kind": "function", "function": "m:f", "cpus_per_actor": 1})
    one_node = lambda cpus: Resources([{"CPU": cpus}], "this machine")
    plans = stage_plans(cfg)
    assert {p.stage for p in plans if p.resident} == {"reference", "policy", "train"}
    # 1 + 1 engines, 2 × 0.5 trainers, a scorer of 1, and 1 left for Ray Data
    assert check_plan(plans, one_node(5.0)) == []
    [problem] = check_plan(plans, one_node(4.0))  # each stage alone fits; beside those not
    assert problem.startswith("stage 'score' (1 × CPU 1) does not fit beside what lives for"
                              " the run (reference 1 × CPU 1 + policy 1 × CPU 1 + train 2 ×"
                              " CPU 0.5)")
    [problem] = check_plan(plans, one_node(3.0))
    assert problem.startswith("what lives for the run (reference 1 × CPU 1 + policy 1 × CPU 1"
                              " + train 2 × CPU 0.5) does not fit this machine (3 CPU / 0 GPU")
    # on two nodes they spread out
    assert check_plan(plans, two_nodes(head_cpus=3.0, worker_cpus=3.0)) == []


def test_reward_model_scorers_hold_their_share_for_the_run():
    """A reward model or a judge lives in actors for the whole run (pipeline.scorers), so
    it is placed with the engines and the trainer; a reward function's tasks are not."""
    cfg = config(train={"cpus_per_worker": 0.5}, reference={"cpus_per_actor": 1},
                 sampling={"cpus_per_actor": 1}, rounds={"mode": "online", "count": 2},
                 reward={"kind": "reward_model", "model": "rm", "cpus_per_actor": 1})
    plans = stage_plans(cfg)
    assert {p.stage for p in plans if p.resident} == {"reference", "policy", "train", "score"}
    one_node = lambda cpus: Resources([{"CPU": cpus}], "this machine")
    assert check_plan(plans, one_node(5.0)) == []  # 4 for the run, 1 for Ray Data
    [problem] = check_plan(plans, one_node(3.5))
    assert problem.startswith("what lives for the run") and "score 1 × CPU 1" in problem


def test_pinned_trainers_are_placed_before_unpinned_engines():
    """A trainer pinned to a node type is placed first, whatever order the nodes come in,
    so unpinned engines do not take the only node it can use (seen with the worker node
    listed first by a real two-node cluster)."""
    cfg = config(train={"resources": {"worker_node": 1}, "placement_strategy": "STRICT_PACK"})
    worker_first = Resources([{"CPU": 2.0, "worker_node": 100.0},
                              {"CPU": 2.0, "head_node": 100.0}], "two nodes")
    assert check_plan(stage_plans(cfg), worker_first) == []
    assert check_plan(stage_plans(cfg), two_nodes()) == []
