"""LoRA (workers.lora): the targets checked on the meta device, and the export (adapter in
PEFT format, merged HF model) against peft's own loading and merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.tiny_models import tiny_qwen2
from workers import lora

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear",
        "use_rslora": False, "shared_engine": True}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_qwen2("sdpa").save_pretrained(path, safe_serialization=True)
    return path


def _trained(base_dir, settings=LORA):
    """The base with adapters whose B is not zero (as after training)."""
    from transformers import AutoModelForCausalLM

    model = lora.wrap(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                      settings, str(base_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return model.eval()


def test_inspect_counts_the_adapters_of_every_linear_layer(base_dir):
    plan = lora.inspect(str(base_dir), LORA)
    # per layer: q 64→64, k 64→32, v 64→32, o 64→64, gate/up 64→128, down 128→64
    per_layer = sum(4 * (i + o) for i, o in [(64, 64), (64, 32), (64, 32), (64, 64),
                                              (64, 128), (64, 128), (128, 64)])
    assert plan.layers == 14
    assert plan.trainable == 2 * per_layer
    assert plan.total == plan.trainable + sum(p.numel() for p in tiny_qwen2("sdpa").parameters())


@pytest.mark.parametrize("change, key, words", [
    ({"target_modules": ["q_proj", "qq_proj"]}, "model.lora.target_modules", "'qq_proj' is no module"),
    ({"target_modules": ["embed_tokens"]}, "model.lora.target_modules", "Embedding, not a Linear"),
    ({"target_modules": ["q_proj", "lm_head"]}, "model.lora.target_modules", "the LM head"),
    ({"target_modules": ["k_proj"], "r": 33}, "model.lora.r", "larger than layer"),
])
def test_inspect_refuses_targets_that_cannot_be_trained(base_dir, change, key, words):
    with pytest.raises(ValueError) as err:
        lora.inspect(str(base_dir), {**LORA, **change})
    assert str(err.value).startswith(key) and words in str(err.value)


def test_merged_state_dict_equals_peft_merge_and_unload(base_dir):
    model = _trained(base_dir)
    inner = model.base_model.model
    merged = lora.merged_state_dict(inner.state_dict(), inner)
    expected = _trained(base_dir).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6, msg=k)


def test_export_writes_an_adapter_peft_loads_and_a_merged_model_that_match(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _trained(base_dir, {**LORA, "use_rslora": True})
    state = {f"lm.{k}": v for k, v in model.base_model.model.state_dict().items()}
    lora.export(state, model, "lm.", tmp_path / "adapter", tmp_path / "model")

    assert lora.is_adapter(tmp_path / "adapter") and not lora.is_adapter(tmp_path / "model")
    assert lora.base_of(tmp_path / "adapter") == str(base_dir.resolve())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is True
    assert list((tmp_path / "adapter").glob("*.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32,
                                                  use_safetensors=True).eval()
    ids = torch.tensor([[3, 9, 27, 81, 5, 44, 60]])
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)
        # and the adapter changed the model (a test of equal copies of the base proves nothing)
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        assert (plain(ids).logits - want).abs().max() > 1e-2


def test_the_adapter_names_its_base_by_absolute_path(base_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(base_dir.parent)
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(base_dir.name), LORA, base_dir.name)
    model.save_pretrained(tmp_path / "adapter")
    assert lora.base_of(tmp_path / "adapter") == str(base_dir.resolve())


def test_a_continued_adapter_is_trainable_on_its_base(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained(base_dir)
    state = {f"lm.{k}": v for k, v in model.base_model.model.state_dict().items()}
    lora.export(state, model, "lm.", tmp_path / "adapter", tmp_path / "model")
    again = lora.load(AutoModelForCausalLM.from_pretrained(lora.base_of(tmp_path / "adapter")),
                      str(tmp_path / "adapter"))
    names = {n for n, p in again.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_vllm_max_rank_is_the_smallest_that_serves_the_rank():
    assert [lora.vllm_max_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]


def _run_config(base_dir, tmp_path, **model):
    from pipeline.config import parse_config

    (tmp_path / "d.parquet").write_bytes(b"")
    return parse_config({"model": {"policy": str(base_dir), **model},
                         "data": {"train": [str(tmp_path / "d.parquet")]},
                         "run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 4}})


def test_bad_lora_configs_are_refused_before_any_cluster_work(base_dir, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.preflight import check_paths

    assert check_paths(_run_config(base_dir, tmp_path, lora={"r": 8})) == []
    problems = check_paths(_run_config(base_dir, tmp_path,
                                       lora={"target_modules": ["q_proj", "attn"]}))
    assert len(problems) == 1 and problems[0].startswith("model.lora.target_modules: 'attn'")
    problems = check_paths(_run_config(base_dir, tmp_path, lora={"r": 64}))
    assert len(problems) == 1 and problems[0].startswith("model.lora.r: 64 is larger than layer")
    adapter = _trained(base_dir).save_pretrained(tmp_path / "adapter") or tmp_path / "adapter"
    problems = check_paths(_run_config(adapter, tmp_path, lora={}))
    assert problems == [(f"model.policy: {adapter} is a LoRA adapter; give its base model"
                         " (model.lora trains new adapters on it)")]
    with pytest.raises(ConfigError, match="model.lora.shared_engine: one engine serves"):
        _run_config(base_dir, tmp_path, reference=str(tmp_path), lora={})
    _run_config(base_dir, tmp_path, reference=str(tmp_path), lora={"shared_engine": False})
    with pytest.raises(ConfigError, match="model.lora.target_modules: .*empty"):
        _run_config(base_dir, tmp_path, lora={"target_modules": []})


def test_dry_run_prints_trainable_parameters_and_memory_next_to_full_fine_tuning(base_dir,
                                                                                 tmp_path):
    from pipeline.cli import dry_run_report
    from pipeline.plan import stage_plans

    cfg = _run_config(base_dir, tmp_path, lora={"r": 4})
    text, problems = dry_run_report(cfg)
    plan = lora.inspect(str(base_dir), cfg.model.lora.model_dump())
    assert problems == []
    assert f"LoRA: {plan.trainable:,} trainable of {plan.total:,} parameters" in text
    full = 16 * (plan.total - plan.trainable)
    adapters = 16 * plan.trainable + 4 * (plan.total - plan.trainable)
    assert f"full fine-tuning  {full / 2**20:.3g} MiB / {full / 2 / 2**20:.3g} MiB" in text
    assert f"LoRA              {adapters / 2**20:.3g} MiB" in text
    # one engine pool serves both roles: the plan places no reference pool
    assert [p.stage for p in stage_plans(cfg)][:2] == ["policy", "prepare"]
    shared = _run_config(base_dir, tmp_path, lora={"shared_engine": False})
    assert [p.stage for p in stage_plans(shared)][:2] == ["reference", "policy"]


def test_evaluating_an_adapter_needs_engines_that_serve_it(base_dir, tmp_path):
    from pipeline.standalone import adapter_problems

    adapter = tmp_path / "adapter"
    _trained(base_dir).save_pretrained(adapter)  # rank 4
    plain = _run_config(base_dir, tmp_path)
    assert adapter_problems(plain, base_dir) == []  # a full model needs nothing
    assert adapter_problems(plain, adapter) == [
        (f"model: {adapter} is a LoRA adapter (rank 4): the engines serve adapters only with"
         " model.lora set (e.g. the override model.lora={r: 4})")]
    assert adapter_problems(_run_config(base_dir, tmp_path, lora={"r": 4}), adapter) == []
    assert adapter_problems(_run_config(base_dir, tmp_path, lora={"r": 1}), adapter)[0].endswith(
        "set model.lora.r=4")
