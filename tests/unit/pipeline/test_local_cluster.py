"""The settings of a local Ray cluster and of the driver's Ray Data that keep small stages
small (their effect is measured in bench/bench_round.py, not asserted here)."""

from __future__ import annotations

from pipeline.cluster import WORKER_ENV_DEFAULTS, configure_ray_data, init_kwargs
from pipeline.config import parse_config


def config(**ray):
    return parse_config({"model": {"policy": "m"}, "data": {"train": ["d.parquet"]},
                         "ray": {"num_cpus": 6, **ray}})


def test_a_local_cluster_keeps_idle_workers_beyond_its_cpu_count():
    """Actors count against Ray's idle-worker limit (the node's CPUs by default); the local
    cluster keeps four idle workers per CPU, and a joined cluster is left as it was started."""
    kwargs = init_kwargs(config(), {})
    assert kwargs["_system_config"]["num_workers_soft_limit"] >= 4 * 6
    assert "_system_config" not in init_kwargs(config(address="auto"), {})


def test_parquet_is_read_through_ray_datas_v1_datasource(monkeypatch):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    configure_ray_data()
    assert ctx.use_datasource_v2 is False
    assert WORKER_ENV_DEFAULTS["RAY_DATA_USE_DATASOURCE_V2"] == "0"  # Ray's processes too
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")  # a user's choice wins
    configure_ray_data()
    assert ctx.use_datasource_v2 is True


def test_a_ray_data_execution_looks_again_at_its_resource_limits_within_50_ms():
    """Ray 2.60 keeps an execution's first answer, no resources, for a second; an upgrade
    that renames the setting must fail here rather than bring the wait back unseen."""
    from ray.data._internal.execution.resource_manager import ResourceManager

    from pipeline.cluster import LIMITS_REFRESH_S

    configure_ray_data()
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == LIMITS_REFRESH_S <= 0.05


def test_a_taken_dashboard_port_is_a_config_error_naming_the_ways_out():
    import socket

    import pytest

    from pipeline.cluster import check_dashboard_port
    from pipeline.config import ConfigError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=f"ray.dashboard_port {port} on 127.0.0.1 is taken"
                                              r".*ray.address=auto"):
            check_dashboard_port("127.0.0.1", port)
    check_dashboard_port("127.0.0.1", port)  # free again
