#!/usr/bin/env bash
# An MLflow tracking server: PostgreSQL backend store, S3 artifact store, bound to loopback.
# Runs in the foreground (use systemd, tmux or nohup to keep it); Ctrl-C stops it.
#   cluster/mlflow/start.sh                 # settings from cluster/mlflow/mlflow.env
#   MLFLOW_PORT=5001 cluster/mlflow/start.sh
# Then: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 echopulse ...   (echopulse submit passes it on)
#
# One-time PostgreSQL setup (as the postgres superuser):
#   CREATE ROLE mlflow LOGIN PASSWORD '...';  CREATE DATABASE mlflow OWNER mlflow;
# MLflow creates and migrates its tables on first start.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ENV_FILE="${MLFLOW_SERVER_ENV:-$HERE/mlflow.env}"
if [[ -f "$ENV_FILE" ]]; then
  while IFS='=' read -r key value; do
    [[ "$key" =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
    if [[ -z "${!key:-}" ]]; then export "$key=$value"; fi
  done < "$ENV_FILE"
else
  echo "note: no settings file $ENV_FILE; using the environment only" >&2
fi
MLFLOW="${MLFLOW:-$HERE/../../.venv/bin/mlflow}"
[[ -x "$MLFLOW" ]] || MLFLOW="$(command -v mlflow || true)"
[[ -n "$MLFLOW" ]] || { echo "error: mlflow is not installed (make install)" >&2; exit 2; }

: "${MLFLOW_HOST:=127.0.0.1}" "${MLFLOW_PORT:=5000}" "${MLFLOW_WORKERS:=2}"
for required in MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION; do
  [[ -n "${!required:-}" ]] || { echo "error: $required is not set (see $ENV_FILE)" >&2; exit 2; }
done
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql*://*) ;;
  *) echo "note: backend store is not PostgreSQL: $MLFLOW_BACKEND_STORE_URI" >&2 ;;
esac
case "$MLFLOW_HOST" in
  127.0.0.1|localhost|::1) ;;
  *) echo "warning: MLflow on $MLFLOW_HOST is reachable from other machines and has no" \
          "authentication of its own; put an authenticating proxy in front of it" >&2 ;;
esac

args=(server
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS")
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
echo "MLflow on http://$MLFLOW_HOST:$MLFLOW_PORT (runs: ...@${MLFLOW_BACKEND_STORE_URI#*@}, artifacts: $MLFLOW_ARTIFACTS_DESTINATION)" >&2
exec "$MLFLOW" "${args[@]}"
