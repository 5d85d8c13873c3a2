"""LoRA through the real components: one vLLM engine serving the base as the reference and
the rounds' adapters as the policy (against a base-only engine and HF + PEFT), the trainer's
adapters under DeepSpeed ZeRO-2 and ZeRO-3, and a LoRA run of the pipeline end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_engine_updates import PROMPTS, RESPONSES, gap
from tests.integration.test_train import halves
from tests.integration.train_run import read_rows, train_rounds

pytestmark = pytest.mark.integration

LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


def fake_trained_adapter(base_dir, out, seed):
    """An adapter on `base_dir` whose B is not zero (as after training), exported as the
    trainer exports it (workers.lora.export): out/adapter, out/model (merged)."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import LoraConfig
    from workers import lora

    model = lora.wrap(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                      LoraConfig(**LORA).model_dump(), str(base_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    state = {f"lm.{k}": v for k, v in model.base_model.model.state_dict().items()}
    lora.export(state, model, "lm.", out / "adapter", out / "model")
    return out / "adapter"


def peft_logprobs(base_dir, adapter_dir=None):
    """Per-token response log-probs of a float32 HF forward of the base (with the adapter
    through PEFT when given)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        out.append(logp.gather(-1, ids[0, 1:, None])[len(prompt) - 1:, 0].tolist())
    return out


def test_one_engine_serves_the_base_as_reference_and_adapters_as_policy(
        ray_cluster, toy_world, make_config, tmp_path):
    """The shared engine against a base-only engine and HF + PEFT, across adapter updates in
    place; it is also SIGKILLed on its second call (tests.integration.test_pool_faults): Ray
    restarts it on the base and the retried call first loads the adapter it names."""
    import ray

    from pipeline.engines import Engines
    from tests.integration.test_pool_faults import dies_once
    from workers.metrics_sink import MetricsSink
    from workers.vllm_pool import Engine

    base = str(toy_world.model_dir)
    first = fake_trained_adapter(base, tmp_path / "round-0", seed=1)
    second = fake_trained_adapter(base, tmp_path / "round-1", seed=2)
    cfg = make_config(tmp_path / "run", model={"policy": base, "lora": LORA})
    marker = tmp_path / "killed"
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(str(tmp_path / "metrics.jsonl"), {})
    with Engines(cfg, sink, engine_cls=dies_once(str(marker))) as engines:
        def both(policy):
            ref = engines.client("reference", base)
            pol = engines.client("policy", str(policy))
            assert ref.actors == pol.actors  # one pool, one engine
            return (ray.get(ref.actors[0].serve.remote(ref.weights_path, ref.weights, ref.version,
                                                       "sequence_logprobs", PROMPTS, RESPONSES)),
                    pol.call(0, "sequence_logprobs", PROMPTS, RESPONSES))

        ref_0, pol_0 = both(first)  # the policy call is the second: the engine dies, comes back
        ref_1, pol_1 = both(second)  # the next round's adapter, loaded in place
        hf_1 = peft_logprobs(base, second)
        # the same adapter directory written again (a round retrained): loaded in place again
        fake_trained_adapter(base, tmp_path / "round-1", seed=3)
        ref_2, pol_2 = both(second)
        # rounds.reference: previous: the reference is round 0's adapter (slot 2), beside
        # the policy's (slot 1)
        previous = engines.client("reference", str(first)).call(
            0, "sequence_logprobs", PROMPTS, RESPONSES)
        pol_3 = engines.client("policy", str(second)).call(
            0, "sequence_logprobs", PROMPTS, RESPONSES)
        slots = ray.get(engines.client("policy", str(second)).actors[0].__ray_call__.remote(
            lambda self: sorted(self.adapters)))
        pools = len(engines.pools)
    ray.get(sink.set_context.remote())  # flushed

    base_only = ray.remote(Engine).options(num_cpus=0).remote(
        base, {"dtype": "float32", "max_model_len": 256, "enforce_eager": True})
    plain = ray.get(base_only.sequence_logprobs.remote(PROMPTS, RESPONSES))
    ray.kill(base_only)
    hf_base = peft_logprobs(base)
    hf_0, hf_2 = peft_logprobs(base, first), peft_logprobs(base, second)
    print(f"gaps: reference vs base-only engine {gap(ref_0, plain):.3g}, vs HF"
          f" {gap(ref_0, hf_base):.3g}; policy vs HF+PEFT {gap(pol_0, hf_0):.3g},"
          f" {gap(pol_1, hf_1):.3g}, {gap(pol_2, hf_2):.3g}")
    assert pools == 1 and slots == [1, 2]
    assert marker.exists(), "the fault was not injected"
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["restarted"] for e in events if e["event"] == "engine_start"] == [False, True]
    # round 0's adapter (loaded by the engine that died, again by its restart), round 1's,
    # round 1's rewritten: each into slot 1, in place; then round 0's as the reference
    assert [e["adapter_slot"] for e in events if e["event"] == "weight_update"] == [1] * 4 + [2]
    for ref in (ref_0, ref_1, ref_2):  # the reference is the base, whatever adapter is loaded
        assert gap(ref, plain) < 1e-5
        assert gap(ref, hf_base) < 1e-4
    assert gap(pol_0, hf_0) < 1e-4
    assert gap(pol_1, hf_1) < 1e-4
    assert gap(pol_2, hf_2) < 1e-4  # the rewritten adapter (hf_2 reads the directory now)
    assert gap(previous, hf_0) < 1e-4 and gap(pol_3, hf_2) < 1e-4  # two adapters at once
    assert gap(pol_0, hf_base) > 1e-2 and gap(pol_1, pol_0) > 1e-2 and gap(pol_2, pol_1) > 1e-2


def lora_config(make_config, tmp_path, policy, **train):
    return make_config(tmp_path / "cfg", model={"policy": str(policy), "lora": LORA},
                       loss={"name": "sigmoid", "params": {"beta": 0.1}},
                       train={"num_workers": 2, "micro_batch_size": 2, "global_batch_size": 4,
                              "learning_rate": 1e-2, "warmup_ratio": 0.0,
                              "lr_schedule": "constant", "max_steps": 3, **train})


def low_rank_update(base: dict, merged: dict, r: int) -> dict[str, float]:
    """For each weight the merged model changed: how far its update is from rank r (the
    (r+1)-th singular value over the first). Weights LoRA does not touch must be equal."""
    ratios = {}
    for k, w in base.items():
        delta = (merged[k].double() - w.double())
        if k.endswith("proj.weight"):
            s = torch.linalg.svdvals(delta)
            assert s[0] > 1e-6, f"{k} was not trained"
            ratios[k] = float(s[r] / s[0])
        else:
            assert torch.equal(merged[k], w), f"{k} changed: the base must stay frozen"
    return ratios


def test_adapters_train_under_zero2_and_zero3_and_continue_on_a_fresh_group(
        pairs_dir, make_config, toy_world, tmp_path):
    """Two rounds of adapters on one trainer at ZeRO-2 and at ZeRO-3 take the same steps;
    the base stays frozen (every update is of rank r); the exported adapter (PEFT) and the
    merged model give the same logits; and a fresh worker group given round 0's adapter
    (a restart at round 1) trains round 1 as the running group did."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = halves(pairs_dir, tmp_path)
    base = load_file(toy_world.model_dir / "model.safetensors")
    curves, adapters = {}, {}
    for stage in (2, 3):
        cfg = lora_config(make_config, tmp_path / f"z{stage}", toy_world.model_dir,
                          zero_stage=stage)
        results, path, outs = train_rounds(cfg, data, tmp_path, f"zero{stage}")
        assert [r["steps_done"] for r in results] == [3, 3]
        assert [r["model_dir"] for r in results] == ["adapter", "adapter"]
        assert [(r["event"], r["zero_stage"]) for r in read_rows(path, "lifecycle")] == [
            ("trainer_start", stage)]
        curves[stage] = [(r["round"], r["step"], r["loss"]) for r in read_rows(path)]
        adapters[stage] = [load_file(o / "adapter" / "adapter_model.safetensors") for o in outs]
        for out in outs:
            ratios = low_rank_update(base, load_file(out / "model" / "model.safetensors"), 8)
            assert len(ratios) == 14 and max(ratios.values()) < 1e-4, ratios
        ids = torch.tensor([[1, 270, 201, 357, 43, 44, 45]])
        merged = AutoModelForCausalLM.from_pretrained(outs[1] / "model").eval()
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_world.model_dir),
                                         outs[1] / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(peft(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    print(f"ZeRO-2: {curves[2]}\nZeRO-3: {curves[3]}")
    for a, b in zip(curves[2], curves[3], strict=True):
        assert a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-5, (a, b)
    assert curves[3][3][2] != curves[3][0][2]  # round 1 trained on from round 0's adapter

    cfg = lora_config(make_config, tmp_path / "fresh", toy_world.model_dir, zero_stage=3)
    _, path, outs = train_rounds(cfg, [data[1]], tmp_path, "fresh",
                                 policy=str(tmp_path / "zero3-out-0" / "adapter"))
    fresh = [(1, r["step"], r["loss"]) for r in read_rows(path)]
    print(f"fresh group at round 1: {fresh}")
    for a, b in zip(curves[3][3:], fresh, strict=True):
        assert a[:2] == b[:2] and abs(a[2] - b[2]) < 1e-5, (a, b)
    mine = load_file(outs[0] / "adapter" / "adapter_model.safetensors")
    assert mine.keys() == adapters[3][1].keys()
    assert max(float((mine[k] - adapters[3][1][k]).abs().max()) for k in mine) < 1e-5


def test_a_lora_run_of_the_demo_offline_then_online(ray_cluster, make_config, toy_world,
                                                    tmp_path):
    """The demo's two rounds (offline on the given pairs, then online on samples of round
    0's adapter) with model.lora, through Ray Data, one vLLM engine (the base as reference,
    the adapters as policy), Ray Train × DeepSpeed ZeRO-3 and evaluate: one engine start for
    the run, each round's adapter loaded in place, adapter and merged model exported."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.dag import console, run_pipeline

    run_dir = tmp_path / "run"
    cfg = make_config(run_dir, model={"policy": str(toy_world.model_dir), "lora": LORA},
                      train={"learning_rate": 1e-3},
                      rounds={"count": 2, "mode": "online", "prompts_per_round": 32,
                              "min_margin": 0.05})
    with console.capture() as captured:
        assert run_pipeline(cfg) == 0
    out = captured.get()
    print(out)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r["kind"] == "lifecycle"]
    starts = [e for e in events if e["event"] == "engine_start"]
    updates = [e for e in events if e["event"] == "weight_update"]
    print(f"lifecycle: {[(e['event'], e.get('pool'), e.get('adapter_slot')) for e in events]}")
    assert [e["pool"] for e in starts] == ["policy-0"]  # one engine serves both roles
    assert [e["event"] for e in events].count("trainer_start") == 1
    # round 0's adapter (evaluate, then round 1's samples), round 1's (evaluate): in place
    assert [e["adapter_slot"] for e in updates] == [1, 1] and all(e["bytes"] > 0 for e in updates)

    def outputs(k, stage):
        return json.loads((run_dir / f"round-{k}" / stage / "manifest.json").read_text())["outputs"]

    trains = [outputs(k, "train") for k in (0, 1)]
    assert [(t["model_dir"], t["merged_dir"]) for t in trains] == [("adapter", "model")] * 2
    assert all(t["steps_done"] >= 1 for t in trains)
    assert outputs(1, "sample")["policy_path"] == str(run_dir / "round-0" / "train" / "adapter")
    for k in (0, 1):
        assert "eval/kl" in outputs(k, "evaluate")["metrics"]
    last = run_dir / "round-1" / "train"
    flat = "".join(out.split())  # the console wraps long paths
    assert f"adapter:{last / 'adapter'}" in flat and f"checkpoint:{last / 'model'}(merged)" in flat
    ids = torch.tensor([[1, 270, 201, 357, 43, 44, 45]])
    merged = AutoModelForCausalLM.from_pretrained(last / "model").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_world.model_dir),
                                     last / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(toy_world.model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
        assert (plain(ids).logits - merged(ids).logits).abs().max() > 1e-3

    # `rayalign resume`: every finished stage of the LoRA run is recognised and skipped
    from pipeline.dag import resume_pipeline

    def manifests():
        return {str(p): p.read_text() for p in sorted(run_dir.glob("round-*/*/manifest.json"))}

    finished = manifests()
    with console.capture() as captured:
        assert resume_pipeline(run_dir) == 0
    assert len(finished) >= 8 and manifests() == finished
    assert captured.get().count("up to date, skipped") >= 8

    # `rayalign export`: the merged model as a clean HF directory, the adapter beside it
    from pipeline.standalone import export_round

    k, files = export_round(run_dir, None, tmp_path / "export")
    assert k == 1 and "model.safetensors" in files and "adapter/" in files
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_world.model_dir),
                                      tmp_path / "export" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(again(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
