"""Build the offline toy world: tokenizer -> tiny Qwen2 -> SFT -> sampled preference pairs.

    world = build_toy_world("/tmp/toy", seed=0)   # ~40 s on one free CPU core
    world = build_toy_world("/tmp/toy", seed=0)   # again: returns at once (manifest matches)

Same seed and settings give byte-identical files on the same software stack and CPU kind
(one torch thread, deterministic algorithms, every random draw seeded from `seed` through
`subseed`). `manifest.json` is removed first and written last, so a build that died half-way
is rebuilt on the next call; the model directory is swapped in whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipeline.toy.reward import ToyRewardParts, toy_reward_parts
from pipeline.toy.task import sample_example, sample_prompts

BUILD_VERSION = 1  # bump when the task, reward or recipe changes: old worlds get rebuilt

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (  # ChatML, as Qwen2
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# transformers' Qwen2Tokenizer's split pattern (letters with one leading non-letter, single digits)
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ToyConfig:
    """Everything that determines a world's bytes; stored in (and matched against) the manifest."""

    seed: int
    n_train_pairs: int
    n_eval_pairs: int
    label_noise: float   # fraction of train pairs with chosen/rejected swapped (eval stays clean)
    sft_steps: int
    quick: bool
    n_heldout_prompts: int
    samples_per_prompt: int
    tokenizer_corpus: int  # synthetic (prompt, response) examples the BPE is trained on
    n_sft_prompts: int = 1500
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2    # 2 layers learn the category -> items link in fewer steps than 4
    num_heads: int = 2     # head_dim 64: supported by every vLLM attention backend
    num_kv_heads: int = 1
    max_positions: int = 512
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    max_new_tokens: int = 40
    temperature: float = 1.0
    gen_batch_prompts: int = 64
    threads: int = 1       # tiny matmuls: 1 thread is as fast, and 2 threads on a busy 2-core
                           # machine spin-wait 10x slower; results also don't depend on cores
    version: int = BUILD_VERSION

    @classmethod
    def resolve(cls, seed: int, n_train_pairs: int, n_eval_pairs: int, label_noise: float,
                sft_steps: int | None, quick: bool) -> ToyConfig:
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        if n_train_pairs < 1 or n_eval_pairs < 1:
            raise ValueError("n_train_pairs and n_eval_pairs must be positive")
        return cls(seed=seed, n_train_pairs=n_train_pairs, n_eval_pairs=n_eval_pairs,
                   label_noise=label_noise, quick=quick,
                   sft_steps=sft_steps if sft_steps is not None else (150 if quick else 600),
                   n_heldout_prompts=32 if quick else 256,
                   samples_per_prompt=4 if quick else 6,
                   tokenizer_corpus=4000 if quick else 20000)


@dataclass(frozen=True)
class ToyWorld:
    """Where a toy world's files live (see `ToyWorld.at`)."""

    root: Path
    model_dir: Path         # HF model + tokenizer (with chat template)
    train_path: Path        # pairs: id, prompt, chosen, rejected, *_score, label_flipped
    eval_path: Path
    train_chat_path: Path   # the same pairs as chat messages (TRL conversational style)
    eval_chat_path: Path
    prompts_path: Path      # held-out prompts: id, prompt, messages
    manifest_path: Path

    @classmethod
    def at(cls, root: str | Path) -> ToyWorld:
        r = Path(root)
        return cls(r, r / "model", r / "train.parquet", r / "eval.parquet",
                   r / "train_chat.parquet", r / "eval_chat.parquet", r / "prompts.parquet",
                   r / "manifest.json")

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def data_files(self) -> list[Path]:
        """Every file of the world except the manifest, in a fixed order."""
        model_files = sorted(p for p in self.model_dir.rglob("*") if p.is_file())
        return model_files + [self.train_path, self.eval_path, self.train_chat_path,
                              self.eval_chat_path, self.prompts_path]


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    label_flipped: bool = False

    def flipped(self) -> Pair:
        return Pair(self.prompt, self.rejected, self.chosen, self.rejected_score,
                    self.chosen_score, not self.label_flipped)


# -----------------------------------------------------------------------------
# small helpers

def subseed(seed: int, name: str) -> int:
    """An independent 63-bit seed for one named random stream of the build."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") >> 1


def batched(xs: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(xs), size):
        yield xs[i:i + size]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def user_messages(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


def render_prompt(tok: PreTrainedTokenizerFast, prompt: str) -> str:
    return tok.apply_chat_template(user_messages(prompt), tokenize=False,
                                   add_generation_prompt=True)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 2)


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seeded RNG, fixed thread count and deterministic kernels; all restored on exit."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det)


# -----------------------------------------------------------------------------
# tokenizer and model

def train_tokenizer(corpus: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any byte string encodes) with ChatML special tokens and chat template.

    The normalizer and pre-tokenizer are Qwen2's: for a qwen2 config, `AutoTokenizer` (v5) loads
    `Qwen2Tokenizer`, which rebuilds exactly this pipeline around the saved vocab and merges.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=EOT,
                                  additional_special_tokens=[IM_START], model_max_length=max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_corpus(prompts: list[str], k: int, rng: random.Random) -> list[str]:
    """`k` chat-shaped lines ("user\\n<prompt>\\nassistant\\n<response>") of the task."""
    examples = (sample_example(rng, prompts) for _ in range(k))
    return [f"user\n{p}\nassistant\n{r}\n" for p, r in examples]


def init_model(cfg: ToyConfig, tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="float32",
    )
    return Qwen2ForCausalLM(config).float()


def save_model(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, model_dir: Path) -> None:
    """Model (safetensors, float32) + tokenizer + generation config, swapped in as a whole."""
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


# -----------------------------------------------------------------------------
# SFT

def sft_batches(tok: PreTrainedTokenizerFast, examples: list[tuple[str, str]],
                batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches; the loss covers the response and its closing <|im_end|> only."""
    prompt_ids = tok([render_prompt(tok, p) for p, _ in examples]).input_ids
    response_ids = tok([r + IM_END for _, r in examples]).input_ids
    for start in range(0, len(examples), batch_size):
        stop = start + batch_size
        rows = list(zip(prompt_ids[start:stop], response_ids[start:stop], strict=True))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            labels[i, len(p):n] = torch.tensor(r)
            mask[i, :n] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft(model: Qwen2ForCausalLM, batches: Iterator[dict[str, torch.Tensor]], steps: int,
        lr: float) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the per-step losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    losses = []
    for batch in tqdm(batches, total=steps, desc="toy sft", leave=False, disable=None):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# sampling and preference pairs

@torch.no_grad()
def sample_responses(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, prompts: Sequence[str],
                     k: int, cfg: ToyConfig, seed: int) -> list[list[str]]:
    """`k` sampled responses for each prompt (one left-padded `generate` call)."""
    enc = tok([render_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
              padding_side="left")
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                         max_new_tokens=cfg.max_new_tokens, num_return_sequences=k,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [[t.strip() for t in texts[i * k:(i + 1) * k]] for i in range(len(prompts))]


def best_vs_worst(prompt: str, responses: list[str], scores: list[float]) -> Pair | None:
    """Highest vs lowest gold score (first of equals); None on a tie."""
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    if math.isclose(scores[best], scores[worst], abs_tol=1e-9):
        return None
    return Pair(prompt, responses[best], responses[worst], scores[best], scores[worst])


def make_pairs(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, prompts: list[str],
               n_pairs: int, cfg: ToyConfig, name: str) -> tuple[list[Pair], list[ToyRewardParts]]:
    """Pairs from the first prompts that give no tie, and the rewards of every sample."""
    pairs: list[Pair] = []
    samples: list[ToyRewardParts] = []
    bar = tqdm(total=n_pairs, desc=f"toy {name} pairs", leave=False, disable=None)
    for b, chunk in enumerate(batched(prompts, cfg.gen_batch_prompts)):
        seed = subseed(cfg.seed, f"{name}-sampling-{b}")
        sampled = sample_responses(model, tok, chunk, cfg.samples_per_prompt, cfg, seed)
        for prompt, responses in zip(chunk, sampled, strict=True):
            parts = [toy_reward_parts(prompt, r) for r in responses]
            samples += parts
            pair = best_vs_worst(prompt, responses, [x.total for x in parts])
            if pair is not None and len(pairs) < n_pairs:
                pairs.append(pair)
                bar.update()
        if len(pairs) == n_pairs:
            bar.close()
            return pairs, samples
    raise RuntimeError(f"only {len(pairs)} of {n_pairs} {name} pairs from {len(prompts)} prompts:"
                       " too many ties, is the SFT model under-trained (sft_steps)?")


def add_label_noise(pairs: list[Pair], fraction: float, rng: random.Random) -> list[Pair]:
    """Swap chosen/rejected (with their scores) in round(fraction * len) pairs, chosen at random."""
    flip = set(rng.sample(range(len(pairs)), round(fraction * len(pairs))))
    return [p.flipped() if i in flip else p for i, p in enumerate(pairs)]


# -----------------------------------------------------------------------------
# parquet files

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def pair_table(pairs: list[Pair], split: str, chat: bool) -> pa.Table:
    text = MESSAGES if chat else pa.string()
    as_prompt = user_messages if chat else str
    as_response = (lambda r: [{"role": "assistant", "content": r}]) if chat else str
    schema = pa.schema([("id", pa.string()), ("prompt", text), ("chosen", text),
                        ("rejected", text), ("chosen_score", pa.float64()),
                        ("rejected_score", pa.float64()), ("label_flipped", pa.bool_())])
    return pa.table({
        "id": [f"{split}-{i:05d}" for i in range(len(pairs))],
        "prompt": [as_prompt(p.prompt) for p in pairs],
        "chosen": [as_response(p.chosen) for p in pairs],
        "rejected": [as_response(p.rejected) for p in pairs],
        "chosen_score": [p.chosen_score for p in pairs],
        "rejected_score": [p.rejected_score for p in pairs],
        "label_flipped": [p.label_flipped for p in pairs],
    }, schema=schema)


def prompts_table(prompts: list[str]) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", MESSAGES)])
    return pa.table({"id": [f"heldout-{i:05d}" for i in range(len(prompts))], "prompt": prompts,
                     "messages": [user_messages(p) for p in prompts]}, schema=schema)


def write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# manifest

def file_hashes(world: ToyWorld) -> dict[str, str]:
    return {str(p.relative_to(world.root)): sha256_file(p) for p in world.data_files()}


def is_complete(world: ToyWorld, cfg: ToyConfig) -> bool:
    """True when `world` holds a finished build of `cfg` whose files are unchanged."""
    try:
        manifest = world.manifest()
        return manifest["config"] == asdict(cfg) and manifest["files"] == file_hashes(world)
    except (OSError, ValueError, KeyError):
        return False


def pair_stats(pairs: list[Pair]) -> dict[str, float]:
    return {
        "n": len(pairs),
        "mean_chosen": statistics.fmean(p.chosen_score for p in pairs),
        "mean_rejected": statistics.fmean(p.rejected_score for p in pairs),
        "frac_chosen_better": statistics.fmean(p.chosen_score > p.rejected_score for p in pairs),
        "frac_flipped": statistics.fmean(p.label_flipped for p in pairs),
    }


def sample_stats(parts: list[ToyRewardParts]) -> dict[str, float]:
    return {
        "n": len(parts),
        "mean_gold": statistics.fmean(x.total for x in parts),
        "std_gold": statistics.pstdev(x.total for x in parts),
        "mean_quality": statistics.fmean(x.quality for x in parts),
        "frac_well_formed": statistics.fmean(x.well_formed for x in parts),
    }


# -----------------------------------------------------------------------------
# the builder

def build_toy_world(out_dir: str | Path, seed: int = 0, *, n_train_pairs: int = 512,
                    n_eval_pairs: int = 128, label_noise: float = 0.1,
                    sft_steps: int | None = None, quick: bool = False,
                    verbose: bool = True) -> ToyWorld:
    """Build (or find already built) the toy world of `seed` in `out_dir`.

    sft_steps: None means 600 (quick: 150). quick: a smaller recipe for tests (~10-30 s);
    the model architecture, task and reward are the same.
    """
    cfg = ToyConfig.resolve(seed, n_train_pairs, n_eval_pairs, label_noise, sft_steps, quick)
    world = ToyWorld.at(out_dir)
    if is_complete(world, cfg):
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    world.manifest_path.unlink(missing_ok=True)  # from here on the directory is incomplete
    manifest = build(world, cfg)
    write_json(manifest, world.manifest_path)
    if verbose:
        print(summary(world, manifest))
    return world


def build(world: ToyWorld, cfg: ToyConfig) -> dict[str, Any]:
    """Write every file of the world but the manifest; return the manifest."""
    timings: dict[str, float] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with deterministic_torch(subseed(cfg.seed, "torch"), cfg.threads):
        pools = split_prompts(cfg)
        with timed(timings, "tokenizer"):
            rng = random.Random(subseed(cfg.seed, "tokenizer-corpus"))
            tok = train_tokenizer(tokenizer_corpus(pools["sft"], cfg.tokenizer_corpus, rng),
                                  cfg.vocab_size, cfg.max_positions)
        with timed(timings, "sft"):
            model = init_model(cfg, tok)
            rng = random.Random(subseed(cfg.seed, "sft-examples"))
            examples = [sample_example(rng, pools["sft"])
                        for _ in range(cfg.sft_steps * cfg.sft_batch_size)]
            losses = sft(model, sft_batches(tok, examples, cfg.sft_batch_size), cfg.sft_steps,
                         cfg.sft_lr)
            save_model(model, tok, world.model_dir)
        with timed(timings, "pairs"):
            train, train_samples = make_pairs(model, tok, pools["train"], cfg.n_train_pairs, cfg,
                                              "train")
            evals, eval_samples = make_pairs(model, tok, pools["eval"], cfg.n_eval_pairs, cfg,
                                             "eval")
            train = add_label_noise(train, cfg.label_noise,
                                    random.Random(subseed(cfg.seed, "label-noise")))
        with timed(timings, "write"):
            write_parquet(pair_table(train, "train", chat=False), world.train_path)
            write_parquet(pair_table(evals, "eval", chat=False), world.eval_path)
            write_parquet(pair_table(train, "train", chat=True), world.train_chat_path)
            write_parquet(pair_table(evals, "eval", chat=True), world.eval_chat_path)
            write_parquet(prompts_table(pools["heldout"]), world.prompts_path)
    timings["total"] = round(time.perf_counter() - wall0, 2)
    timings["total_cpu"] = round(time.process_time() - cpu0, 2)
    return {
        "config": asdict(cfg),
        "sizes": {"vocab": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
                  "train_pairs": len(train), "eval_pairs": len(evals),
                  "heldout_prompts": len(pools["heldout"]), "sft_examples": len(examples)},
        "sft": {"first_loss": losses[0], "final_loss": statistics.fmean(losses[-10:])},
        "reward_stats": {"train_pairs": pair_stats(train), "eval_pairs": pair_stats(evals),
                         "sft_samples": sample_stats(train_samples + eval_samples)},
        "timings_s": timings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "pyarrow": pa.__version__},
        "files": file_hashes(world),
    }


def split_prompts(cfg: ToyConfig) -> dict[str, list[str]]:
    """Disjoint prompt pools: held-out, eval pairs, train pairs (2x the pairs, for ties), SFT."""
    sizes = {"heldout": cfg.n_heldout_prompts, "eval": 2 * cfg.n_eval_pairs + 16,
             "train": 2 * cfg.n_train_pairs + 16, "sft": cfg.n_sft_prompts}
    rng = random.Random(subseed(cfg.seed, "prompts"))
    prompts = sample_prompts(rng, sum(sizes.values()))
    rng.shuffle(prompts)  # the same mix of prompt kinds in every pool
    pools, start = {}, 0
    for name, size in sizes.items():
        pools[name] = prompts[start:start + size]
        start += size
    return pools


def summary(world: ToyWorld, manifest: dict[str, Any]) -> str:
    t, r, sizes, losses = (manifest[k] for k in ("timings_s", "reward_stats", "sizes", "sft"))
    def fmt(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in d.items())

    return "\n".join([
        f"toy world (seed {manifest['config']['seed']}) in {world.root}",
        f"  timings (s): {fmt(t)}",
        f"  model: {sizes['parameters']:,} parameters, vocab {sizes['vocab']},"
        + f" sft loss {losses['first_loss']:.2f} -> {losses['final_loss']:.2f}",
        f"  samples: {fmt(r['sft_samples'])}",
        f"  train pairs: {fmt(r['train_pairs'])}",
        f"  eval pairs: {fmt(r['eval_pairs'])}",
    ])
