"""Pure parts of the trainer loop: NaN/inf policy, data cursor, attention choice, options."""

from __future__ import annotations

import numpy as np
import torch

from workers.nonfinite import NonFiniteGuard, all_ranks, local_weights_finite
from workers.recipe.recipe import batch_digest, global_micro_batches


def test_skip_counts_until_the_limit():
    guard = NonFiniteGuard("skip", max_skipped=2)
    assert not guard.record("loss", 3, ["a", "b"])
    assert not guard.record("gradient", 5, ["c"])
    assert guard.record("loss", 7, ["d"])
    assert guard.skipped == 3 and "more than train.max_nonfinite=2" in guard.stop_reason
    assert [e["ids"] for e in guard.events] == [["a", "b"], ["c"], ["d"]]


def test_stop_stops_at_the_first_and_keeps_the_ids():
    guard = NonFiniteGuard("stop", max_skipped=10)
    assert guard.record("loss", 4, [17, 18])
    assert guard.stop_reason == "non-finite loss at optimizer step 4 (train.on_nonfinite=stop)"
    assert guard.events == [{"what": "loss", "step": 4, "ids": ["17", "18"]}]


def test_nonfinite_weights_always_stop():
    assert NonFiniteGuard("skip", max_skipped=10).record("weights", 9, [])


def test_weights_check_and_single_process_reduction():
    layer = torch.nn.Linear(3, 2)
    assert local_weights_finite(layer)
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
    assert not local_weights_finite(layer)
    assert all_ranks(True) and not all_ranks(False)


class FakeShard:
    """iter_batches over an in-memory column dict, like a Ray DataIterator."""

    def __init__(self, n: int):
        self.ids = np.array([f"p{i}" for i in range(n)], dtype=object)

    def iter_batches(self, batch_size, batch_format, drop_last):
        assert batch_format == "numpy" and drop_last
        for start in range(0, len(self.ids) - batch_size + 1, batch_size):
            yield {"id": self.ids[start:start + batch_size]}


def test_cursor_resumes_exactly_where_it_stopped():
    shard = FakeShard(10)  # 2 full batches of 4 per epoch (the last 2 rows dropped)
    full = [(c, e, list(rows["id"])) for c, e, rows in global_micro_batches(shard, 4, 3, 0)]
    assert [(c, e) for c, e, _ in full] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert full[0][2] == ["p0", "p1", "p2", "p3"] and full[2][2] == full[0][2]
    resumed = [(c, e, list(rows["id"])) for c, e, rows in global_micro_batches(shard, 4, 3, 3)]
    assert resumed == full[3:]


def test_batch_digest_depends_on_order():
    assert batch_digest(["a", "b"]) != batch_digest(["b", "a"])
    assert batch_digest(["a", "b"]) == batch_digest(np.array(["a", "b"], dtype=object))


def test_attention_choice():
    from workers.recipe.options import attn_implementation
    from workers.recipe.recipe import pair_tokens

    assert attn_implementation("auto", packing=True, cuda=True) == "flex_attention"
    assert attn_implementation("auto", packing=True, cuda=False) == "sdpa"  # no CPU backward
    assert attn_implementation("auto", packing=False, cuda=True) == "sdpa"
    assert attn_implementation("flash", packing=True, cuda=True) == "flash_attention_2"
    rows = {"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4]], "rejected_ids": [[5, 6]]}
    assert pair_tokens(rows) == 2 * 3 + 1 + 2


def loop_config(**overrides):
    from workers.recipe.options import TrainLoopConfig

    base = {"tokenizer_path": "m", "loss_name": "sigmoid", "loss_params": {},
                "zero_stage": 3, "micro_batch_size": 2, "grad_accum_steps": 1,
                "epochs": 1, "learning_rate": 1e-3, "lr_schedule": "constant",
                "grad_clip": 1.0, "weight_decay": 0.01, "adam_betas": (0.9, 0.95), "seed": 0, "bf16": False,
                "gradient_checkpointing": False}
    return TrainLoopConfig(**{**base, **overrides})


def test_offload_settings_reach_the_deepspeed_config():
    from workers.recipe.options import deepspeed_config

    plain = deepspeed_config(loop_config(), 64)["zero_optimization"]
    assert "offload_optimizer" not in plain and "offload_param" not in plain
    both = deepspeed_config(loop_config(optimizer="cpu_adam", offload_params=True), 64)
    assert both["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert both["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_deepspeed_clips_unless_the_trainer_does():
    """ZeRO-0 in fp32: the trainer clips (DeepSpeed would drop the norm), DeepSpeed is told
    not to; everywhere else DeepSpeed clips by train.grad_clip."""
    from workers.recipe.options import deepspeed_config, trainer_clips

    for overrides, trainer in (({"zero_stage": 0}, True), ({"zero_stage": 3}, False),
                               ({"zero_stage": 0, "bf16": True}, False)):
        cfg = loop_config(**overrides)
        assert trainer_clips(cfg) is trainer
        assert deepspeed_config(cfg)["gradient_clipping"] == (0.0 if trainer else 1.0)


def test_build_optimizer_follows_the_config():
    from workers.recipe.options import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(loop_config(), params)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.95), 0.01)
    assert group["fused"]  # one kernel for all the parameters: CPU and CUDA have it


def test_fused_adamw_takes_the_per_parameter_loops_step():
    """The fused AdamW the trainer builds updates the weights as torch's per-parameter loop
    does (to float32 rounding), with weight decay, over several steps."""
    from workers.recipe.options import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(5)]
    runs = []
    for build in (lambda ps: build_optimizer(loop_config(), ps),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95),
                                               weight_decay=0.01, eps=1e-8, foreach=False)):
        ps = [torch.nn.Parameter(w.clone()) for w in start]
        opt = build(ps)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        runs.append(ps)
    for fused, loop, w in zip(*runs, start):
        assert float((fused - w).abs().max()) > 1e-3  # the weights moved
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)


def test_auto_zero_stage_replicates_only_what_fits_in_fp32_without_offload():
    from workers.recipe.options import STATE_BYTES_PER_PARAMETER, auto_zero_stage

    gib = 2**30
    auto = loop_config(zero_stage="auto")
    fits = int(0.25 * 80 * gib / STATE_BYTES_PER_PARAMETER)  # a quarter of an 80 GiB device
    assert auto_zero_stage(auto, fits, 80 * gib) == 0
    assert auto_zero_stage(auto, fits + 1, 80 * gib) == 3
    assert auto_zero_stage(auto, 7 * 10**9, 80 * gib) == 3  # a 7B policy: 112 GB of state
    for memory_saving in ({"bf16": True}, {"optimizer": "cpu_adam"}, {"offload_params": True}):
        assert auto_zero_stage(loop_config(zero_stage="auto", **memory_saving), 10, gib) == 3
    assert auto_zero_stage(loop_config(zero_stage=2), 10, gib) == 2  # a given stage stays


def test_parameter_count_reads_safetensors_headers(tmp_path):
    """Counted from the headers, a tied head once, across shards; no weights loaded."""
    import torch
    from safetensors.torch import save_file

    from workers.recipe.recipe import parameter_count

    save_file({"embed": torch.zeros(10, 4), "norm": torch.zeros(4)},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"layer": torch.zeros(3, 4, 2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert parameter_count(str(tmp_path)) == 40 + 4 + 24
