#!/usr/bin/env bash
# A Ray head on this machine, bound to loopback: dashboard and job server on 127.0.0.1 only.
#   cluster/local.sh start   # then: RAY_ADDRESS=127.0.0.1:6379 echopulse ...
#   cluster/local.sh stop
# Ray's job API has no authentication of its own beyond the cluster token: keep it on loopback
# (or behind an SSH tunnel / authenticated proxy), never on a public interface.
set -euo pipefail
RAY="${RAY:-$(dirname "$0")/../.venv/bin/ray}"
PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
case "${1:-}" in
  start)
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --disable-usage-stats
    echo "Ray head on 127.0.0.1:$PORT; jobs at http://127.0.0.1:$DASHBOARD_PORT"
    ;;
  stop)
    "$RAY" stop
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
