#!/usr/bin/env bash
# A Ray head on this machine, bound to loopback: dashboard and job server on 127.0.0.1 only.
#   cluster/local.sh start    # then: echopulse submit -- ingest ...   (or RAY_ADDRESS=127.0.0.1:6379)
#   cluster/local.sh status
#   cluster/local.sh stop     # stops only the head this script started (never `ray stop`, which
#                             # kills every Ray process on the machine)
# Settings (environment): RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001),
#   RAY_AGENT_PORT (52365), RAY_NUM_CPUS (this machine's), RAY_NUM_GPUS, RAY_STATE_DIR (~/.echopulse),
#   RAY_TEMP_DIR (Ray's session files; default /tmp/ray).
# Jobs run `python` from the directory of the `ray` used here (the project's .venv by default).
# Token: Ray 2.59+ turns on token authentication for local clusters. The head uses RAY_AUTH_TOKEN,
#   RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (generated here if none exists); `echopulse submit`
#   finds it the same way. Ray's job API has no authentication beyond this token: keep the
#   dashboard port on loopback (or behind an SSH tunnel / authenticated proxy), never on a public
#   interface, and keep the token file private (mode 600).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RAY="${RAY:-$HERE/../.venv/bin/ray}"
PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${RAY_AGENT_PORT:-52365}"
STATE_DIR="${RAY_STATE_DIR:-$HOME/.echopulse}"
PIDFILE="$STATE_DIR/ray-head-$PORT.pid"
LOGFILE="$STATE_DIR/ray-head-$PORT.log"

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then
      echo "a Ray head started by this script is already running (pid $(cat "$PIDFILE"))"
      exit 0
    fi
    mkdir -p "$STATE_DIR"
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" \
          && ! -s "$HOME/.ray/auth_token" ]]; then
      mkdir -p "$HOME/.ray"
      (umask 077 && "$RAY" get-auth-token --generate >/dev/null)
      chmod 600 "$HOME/.ray/auth_token"
    fi
    args=(--head --block --node-ip-address=127.0.0.1 --port="$PORT"
          --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT"
          --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT"
          --disable-usage-stats)
    [[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus="$RAY_NUM_CPUS")
    [[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RAY_NUM_GPUS")
    [[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$RAY_TEMP_DIR")
    # a job's `python` is the Python that runs this head (the one with Ray and EchoPulse installed)
    PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"
    export PATH
    # a local head has no one to drain for: stop within seconds (Ray's default waits up to 30 s)
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
    # --block keeps `ray start` in the foreground as the head's owner: stopping it (SIGTERM) drains
    # and stops exactly this head's processes. setsid gives it its own process group.
    setsid nohup "$RAY" start "${args[@]}" >"$LOGFILE" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 1 120); do   # up to 60 s for the job server to answer
      if ! running; then
        echo "the Ray head failed to start; see $LOGFILE" >&2
        tail -n 20 "$LOGFILE" >&2
        rm -f "$PIDFILE"
        exit 1
      fi
      if (exec 3<>"/dev/tcp/127.0.0.1/$DASHBOARD_PORT") 2>/dev/null; then
        echo "Ray head on 127.0.0.1:$PORT (pid $(cat "$PIDFILE"), log $LOGFILE)"
        echo "jobs:  echopulse submit --address http://127.0.0.1:$DASHBOARD_PORT -- COMMAND ..."
        echo "Ray:   RAY_ADDRESS=127.0.0.1:$PORT echopulse COMMAND ..."
        exit 0
      fi
      sleep 0.5
    done
    echo "the Ray job server did not answer on 127.0.0.1:$DASHBOARD_PORT within 60 s; see $LOGFILE" >&2
    exit 1
    ;;
  stop)
    if ! running; then
      echo "no Ray head started by this script is running (port $PORT)"
      rm -f "$PIDFILE"
      exit 0
    fi
    pid="$(cat "$PIDFILE")"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do   # Ray drains for up to 30 s
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL -- "-$pid" 2>/dev/null || true   # its own process group (setsid above)
    fi
    rm -f "$PIDFILE"
    echo "stopped the Ray head on port $PORT"
    ;;
  status)
    if running; then echo "running (pid $(cat "$PIDFILE"))"; else echo "not running"; exit 1; fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
