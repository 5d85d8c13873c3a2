"""Starting or joining Ray, and the environment every worker process gets."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig
from workers.logsetup import LOG_DIR_ENV

# Defaults for processes Ray starts; a value already in the driver's environment wins.
WORKER_ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_V2_ENABLED": "1",
    # CPU: the vLLM engine core runs inside its actor (starts ~3x faster than a child process)
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # quiet libraries: a worker's output lands in <run_dir>/logs (see pipeline.console), and
    # these keep it to what helps there (and on the console with --verbose)
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # parquet reads through Ray Data's V1 datasource (see configure_ray_data)
    "RAY_DATA_USE_DATASOURCE_V2": "0",
}
# (VLLM_CPU_KVCACHE_SPACE is not among them: each pool sets its own engine.kv_cache_space_gib,
# see workers.vllm_pool.Engine.)
PASS_THROUGH = ("TORCH_EXTENSIONS_DIR", "VLLM_CACHE_ROOT", "HF_HOME", "PYTHONPATH",
                "RAY_AUTH_MODE")


# Credentials in the driver's environment (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...):
# never passed to workers. Ray's own variables (RAY_AUTH_TOKEN, ...) are Ray's business.
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_KEY|ACCESS_KEY"
                         r"|PRIVATE_KEY)(_|$)", re.IGNORECASE)


def secret_names(environ: dict[str, str]) -> list[str]:
    return [k for k in environ if SECRET_NAME.search(k) and not k.startswith("RAY_")]


@contextmanager
def _secrets_hidden_from_children() -> Iterator[None]:
    """Processes started inside (a local cluster's GCS, raylet and so every worker) do not
    inherit the credentials in this process's environment; this process keeps them."""
    saved = {k: os.environ.pop(k) for k in secret_names(dict(os.environ))}
    try:
        yield
    finally:
        os.environ.update(saved)


def worker_env(cfg: RunConfig, verbose: bool = False) -> dict[str, str]:
    """The environment of every process Ray starts for the run. Unless `verbose`, it names
    the run's logs directory, where workers.logsetup sends each process's output."""
    env = base_env()
    if not verbose:
        env[LOG_DIR_ENV] = str(Path(cfg.run_dir).resolve() / "logs")
    if cfg.train.gpus_per_worker > 0 or cfg.reference.gpus_per_actor > 0:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cuda")
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return env


def base_env() -> dict[str, str]:
    """The defaults (a value in this process's environment wins) and the pass-through
    variables: what every process Ray starts gets, with or without a run config."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}
    env.update({k: os.environ[k] for k in PASS_THROUGH if k in os.environ})
    return env


@contextmanager
def local_cluster(num_cpus: int, env: dict[str, str] | None = None, temp_dir: str | None = None,
                  log_to_driver: bool = False) -> Iterator[dict[str, str]]:
    """A local Ray cluster without a run config, for tests and benchmarks (a run starts its
    own through `connect`): the workers get base_env() plus `env`, and so does this process
    (it runs Ray Data and Ray Train drivers too); shut down on exit. Yields the env."""
    import ray

    env = {**base_env(), **(env or {})}
    os.environ.update(env)
    with _secrets_hidden_from_children():
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 _temp_dir=temp_dir, log_to_driver=log_to_driver, logging_level="ERROR",
                 _system_config=local_system_config(num_cpus))
    configure_ray_data()
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield env
    finally:
        ray.shutdown()


LIMITS_REFRESH_S = 0.05  # how often a Ray Data execution looks again at its resource limits


def configure_ray_data() -> None:
    """This process's Ray Data settings (a Dataset is planned in the process that builds it,
    so the driver's context is the one that counts). Parquet is read through the V1
    datasource: Ray 2.60's default V2 starts a pool of footer-reader actors, a new process
    each, for every `read_parquet`, 3-8 s on a small file against 0.1-0.4 s for V1, which
    was most of a small online round (bench/RESULTS.md, "Rounds at the speed of their
    compute"), and resource limits are looked at again every LIMITS_REFRESH_S."""
    import ray.data
    from ray.data._internal.execution.resource_manager import ResourceManager

    ray.data.DataContext.get_current().use_datasource_v2 = (
        os.environ.get("RAY_DATA_USE_DATASOURCE_V2", WORKER_ENV_DEFAULTS["RAY_DATA_USE_DATASOURCE_V2"]) != "0")
    # Ray 2.60: an execution asks the autoscaling coordinator for its resources without
    # waiting, so its first look sees none, and it keeps that answer for
    # GLOBAL_LIMITS_UPDATE_INTERVAL_S (1 s): every dataset whose operators are not fused into
    # one task (an engine or scorer map with a batch_size and no CPU of its own) then waits
    # ~1 s before its first task, ~2 s of a small online round. Looking again every 50 ms
    # keeps the wait under 0.1 s (bench/RESULTS.md, "Small rounds, again").
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = min(
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S, LIMITS_REFRESH_S)


def local_system_config(num_cpus: float | None) -> dict[str, Any]:
    """Ray settings of a local cluster this process starts. Ray keeps at most as many idle
    worker processes as the node has CPUs, and every actor (the engines, the trainer
    workers, the run's small actors: a dozen) counts as one: on a small node each idle task
    worker is then ended within a second, and every Ray Data task of the next stage starts
    a new process (~2 s each here, most of a small online round). Keep four per CPU. (A
    cluster started with `ray start` takes RAY_num_workers_soft_limit from its
    environment, see cluster/README.md.)"""
    return {"num_workers_soft_limit": max(16, 4 * int(num_cpus or os.cpu_count() or 1))}


def connect(cfg: RunConfig, verbose: bool = False) -> dict[str, Any]:
    """ray.init for this run; returns {'dashboard_url', 'address', 'started_local'}."""
    import ray

    env = worker_env(cfg, verbose)
    for k, v in env.items():  # the driver process itself runs Ray Data/Train drivers too
        os.environ.setdefault(k, v)
    configure_ray_data()
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return {"dashboard_url": _dashboard_url(None), "address": ctx.gcs_address,
                "started_local": False}
    if cfg.ray.address is None:
        check_dashboard_port(cfg.ray.dashboard_host, cfg.ray.dashboard_port)
    # Inside a submitted job, Ray refuses env vars set both by the job and by ray.init.
    job_env = _job_env_vars()
    env = {k: v for k, v in env.items() if k not in job_env}
    with _secrets_hidden_from_children():  # a local cluster's processes are our children
        info = ray.init(**init_kwargs(cfg, env, verbose))
    return {"dashboard_url": _dashboard_url(info), "address": info.address_info.get("gcs_address"),
            "started_local": cfg.ray.address is None}


def check_dashboard_port(host: str, port: int) -> None:
    """A local cluster's dashboard port taken (a second run or sweep on this machine, another
    Ray cluster, another program) is a ConfigError naming the ways out, before Ray starts half
    a cluster and fails with a traceback. The same test as Ray's (bind with SO_REUSEADDR)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"ray.dashboard_port {port} on {host} is taken ({err.strerror}): another Ray"
                " cluster (a run or sweep already going?) or program holds it. Join that"
                " cluster with ray.address=auto (or `--ray-address`), or start another with a"
                " free ray.dashboard_port=...") from None


WORKER_SETUP_HOOK = "workers.logsetup.setup_worker_logging"


def init_kwargs(cfg: RunConfig, env: dict[str, str], verbose: bool = False) -> dict[str, Any]:
    """ray.init arguments: join ray.address, or start a local cluster whose dashboard binds
    to ray.dashboard_host (127.0.0.1 unless configured). Unless `verbose`, workers' output
    goes to their log files (the setup hook) and not to the driver, and Ray leaves the
    driver's logging as pipeline.console.quiet_driver set it."""
    runtime_env: dict[str, Any] = {"env_vars": env}
    if not verbose:
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": verbose,
                              "configure_logging": verbose}
    if cfg.ray.address is not None:
        return {**kwargs, "address": cfg.ray.address}
    kwargs.update(num_cpus=cfg.ray.num_cpus, include_dashboard=True,
                  dashboard_host=cfg.ray.dashboard_host, dashboard_port=cfg.ray.dashboard_port,
                  resources=dict(cfg.ray.resources) or None,
                  _system_config=local_system_config(cfg.ray.num_cpus))
    temp = os.environ.get("RAYALIGN_RAY_TEMP_DIR")
    if temp:
        Path(temp).mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = temp
    return kwargs


def _dashboard_url(info: Any) -> str | None:
    url = getattr(info, "dashboard_url", None) if info is not None else None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env of the Ray job this driver runs in ({} outside a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def cluster_nodes(address: str) -> list[dict[str, float]]:
    """Total resources of each alive node of a running cluster.

    An http(s) address is a dashboard: ask its state API (no driver is started). Any other
    address ('auto', 'HOST:PORT', 'ray://…') is joined with ray.init and left again.
    """
    if address.startswith(("http://", "https://")):
        from ray.util.state import list_nodes
        from ray.util.state.exception import RayStateApiException

        try:
            nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True,
                               raise_on_missing_output=False)
        except RayStateApiException as err:
            raise ConnectionError(str(err).splitlines()[0]) from None
        return [dict(n.resources_total) for n in nodes]
    import ray

    joined = not ray.is_initialized()
    if joined:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    finally:
        if joined:
            ray.shutdown()
