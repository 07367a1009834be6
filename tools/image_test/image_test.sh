#!/usr/bin/env bash
# `make image-test`: build the trainer image with `sam build` and run every events/*.json through it with
# `sam local invoke` (tools/image_test/run.py checks each documented result). Takes minutes; not in `make test`.
# Arguments go to run.py: `--only events/worker.json` (what `make invoke EVENT=...` passes).
#
# Needs a Docker engine: one at DOCKER_HOST or /var/run/docker.sock is used as it is; otherwise, as root, a
# private one is installed if missing (Debian's docker.io) and started, then stopped at the end with the host's
# bridge, iptables rules and net.ipv4.ip_forward put back (tools/image_test/engine.sh). Without root and
# without a running engine it skips with one line and exits 0.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
SAM=${SAM:-$(dirname "$PY")/sam}
started=$(date +%s)

step() { echo "image-test: $* ($(( $(date +%s) - started )) s)"; }

if ! command -v docker >/dev/null && [ "$(id -u)" -ne 0 ]; then
  echo "image-test: skipped: no docker command, and installing an engine needs root" >&2; exit 0
fi
exports=$("$HERE/engine.sh" start); status=$?
if [ $status -eq 3 ]; then exit 0; fi  # engine.sh said why, in one line
[ $status -eq 0 ] || { echo "image-test: error: could not start a Docker engine" >&2; exit 1; }
eval "$exports"
export DOCKER_HOST SAM_CLI_TELEMETRY=0
trap '"$HERE/engine.sh" stop' EXIT
step "engine at $DOCKER_HOST"

PYTHON=$PY "$ROOT/tools/lambda_base/build.sh" || exit 1
step "base image public.ecr.aws/lambda/python:3.12 ready"

mkdir -p "$ROOT/.local"
(cd "$ROOT" && "$SAM" build TrainerFunction --build-dir .aws-sam/build) >"$ROOT/.local/image-test-build.log" 2>&1 \
  || { tail -20 "$ROOT/.local/image-test-build.log" >&2; echo "image-test: error: sam build failed" >&2; exit 1; }
step "sam build TrainerFunction ($(docker image inspect --format '{{.Size}}' trainerfunction:python3.12-v1 | awk '{printf "%.2f GB", $1/1e9}'))"

"$PY" -u "$ROOT/tools/image_test/run.py" --sam "$SAM" "$@" | grep --line-buffered -v '^{"level"'
result=${PIPESTATUS[0]}
step "done"
exit "$result"
