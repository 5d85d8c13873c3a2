#!/usr/bin/env bash
# Two Ray nodes on one machine, for trying multi-node placement without a second machine:
# a head node (custom resource "head_node") and a second node ("worker_node"), each with its
# own temp dir and ports, both on 127.0.0.1. Everything here can be overridden by env vars.
#
#   cluster/local-two-nodes.sh start    # prints the dashboard / job-submission address
#   cluster/local-two-nodes.sh status
#   cluster/local-two-nodes.sh stop     # stops only the processes this cluster started
#
# `ray stop` would kill every Ray process of this user on the machine; `stop` here instead
# kills the processes that inherited this cluster's RAYALIGN_CLUSTER_ID (Ray's daemons, its
# workers, job drivers and their children), by pid.
set -euo pipefail

DIR=${RAYALIGN_CLUSTER_DIR:-/tmp/rayalign-two-nodes}
RAY=${RAY:-ray}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # same value for every command (STACK-NOTES)
# idle workers a node keeps (Ray's default: its CPU count, and actors count): see
# pipeline.cluster.local_system_config
export RAY_num_workers_soft_limit=${RAY_num_workers_soft_limit:-16}
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CLIENT_PORT=${CLIENT_PORT:-10001}   # outside the worker ports (10002-19999)
HEAD_CPUS=${HEAD_CPUS:-2}
WORKER_CPUS=${WORKER_CPUS:-2}
HEAD_RESOURCES=${HEAD_RESOURCES:-'{"head_node": 100}'}
WORKER_RESOURCES=${WORKER_RESOURCES:-'{"worker_node": 100}'}
HEAD_METRICS_PORT=${HEAD_METRICS_PORT:-8090}
WORKER_METRICS_PORT=${WORKER_METRICS_PORT:-8091}
HEAD_AGENT_PORT=${HEAD_AGENT_PORT:-52365}
WORKER_AGENT_PORT=${WORKER_AGENT_PORT:-52366}

pids_of_cluster() {
    local id=$1 f
    for f in /proc/[0-9]*/environ; do
        if { tr '\0' '\n' <"$f"; } 2>/dev/null | grep -qx "RAYALIGN_CLUSTER_ID=$id"; then
            f=${f#/proc/}
            echo "${f%/environ}"
        fi
    done
}

start() {
    mkdir -p "$DIR/head" "$DIR/worker"
    if [[ -s "$DIR/cluster-id" ]] && [[ -n "$(pids_of_cluster "$(cat "$DIR/cluster-id")")" ]]; then
        echo "a cluster from $DIR is already running; stop it first" >&2
        exit 1
    fi
    RAYALIGN_CLUSTER_ID="rayalign-$(date +%s)-$$"
    export RAYALIGN_CLUSTER_ID
    echo "$RAYALIGN_CLUSTER_ID" >"$DIR/cluster-id"
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
        --num-cpus="$HEAD_CPUS" --resources="$HEAD_RESOURCES" --temp-dir="$DIR/head" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --ray-client-server-port="$CLIENT_PORT" --metrics-export-port="$HEAD_METRICS_PORT" \
        --dashboard-agent-listen-port="$HEAD_AGENT_PORT" --disable-usage-stats
    "$RAY" start --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 \
        --num-cpus="$WORKER_CPUS" --resources="$WORKER_RESOURCES" --temp-dir="$DIR/worker" \
        --metrics-export-port="$WORKER_METRICS_PORT" \
        --dashboard-agent-listen-port="$WORKER_AGENT_PORT" --disable-usage-stats
    echo "two nodes up: GCS 127.0.0.1:$GCS_PORT, jobs and dashboard http://127.0.0.1:$DASHBOARD_PORT"
    echo "metrics: http://127.0.0.1:$HEAD_METRICS_PORT/metrics, http://127.0.0.1:$WORKER_METRICS_PORT/metrics"
}

stop() {
    [[ -s "$DIR/cluster-id" ]] || { echo "no cluster recorded in $DIR"; return 0; }
    local id pids
    id=$(cat "$DIR/cluster-id")
    pids=$(pids_of_cluster "$id" | tr '\n' ' ')
    if [[ -n "${pids// /}" ]]; then
        # shellcheck disable=SC2086  # one pid per word
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 20); do
            pids=$(pids_of_cluster "$id" | tr '\n' ' ')
            [[ -z "${pids// /}" ]] && break
            sleep 0.5
        done
        # shellcheck disable=SC2086
        [[ -n "${pids// /}" ]] && kill -KILL $pids 2>/dev/null || true
    fi
    rm -f "$DIR/cluster-id"
    echo "stopped cluster $id"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) "$RAY" status --address="127.0.0.1:$GCS_PORT" ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
