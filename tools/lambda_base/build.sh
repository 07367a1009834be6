#!/usr/bin/env bash
# Make `public.ecr.aws/lambda/python:3.12` available to the Docker engine at DOCKER_HOST:
#
#   1. present already (pulled, or built by an earlier run): nothing to do;
#   2. `docker pull` succeeds within PULL_TIMEOUT_S: the official image;
#   3. else build a stand-in from Debian packages and PyPI and tag it with the official name.
#
# How the stand-in differs from the official image (AWS's "Lambda base image for Python 3.12"):
#   - OS:        Debian 12 bookworm minbase (debootstrap from deb.debian.org), glibc 2.36
#                (official: Amazon Linux 2023, glibc 2.34).
#   - Python:    Debian's CPython 3.11 in a venv at /var/lang (official: CPython 3.12 at /var/lang).
#                Debian 12 has no 3.12 and there is no other 3.12 this machine can install; the image's
#                pins (src/handler/requirements.txt) also resolve for 3.11, which the project supports.
#                The template gate (`pip` step) still proves the pins resolve for 3.12 on glibc 2.34.
#   - Runtime:   awslambdaric (AWS's open-source runtime interface client, from PyPI) started by
#                /var/runtime/bootstrap (official: AWS's bundled runtime in /var/runtime).
#   - Emulator:  /usr/local/bin/aws-lambda-rie is the copy SAM CLI ships (samcli/local/rapid), as in the
#                official image; /lambda-entrypoint.sh behaves as the official one (handler = only argument,
#                the emulator when AWS_LAMBDA_RUNTIME_API is unset).
#   - Same:      LAMBDA_TASK_ROOT=/var/task, LAMBDA_RUNTIME_DIR=/var/runtime, WORKDIR /var/task,
#                ENTRYPOINT ["/lambda-entrypoint.sh"], `pip` on PATH installs into /var/lang.
#   - Extra:     the build machine's CA bundle replaces Debian's, and PIP_CERT points at it, so pip in
#                `docker build` trusts what the host trusts. No boto3 preinstalled (the trainer pins its own).
#   - Label:     io.lambdatrain.stand-in=true, so nobody mistakes it for the official image.
set -euo pipefail

IMAGE=public.ecr.aws/lambda/python:3.12
ROOTFS_IMAGE=lambdatrain/bookworm-minbase:python3
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PULL_TIMEOUT_S=${PULL_TIMEOUT_S:-60}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

say() { echo "lambda_base: $*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  kind=$(docker image inspect --format '{{ index .Config.Labels "io.lambdatrain.stand-in" }}' "$IMAGE")
  say "$IMAGE is present ($([ "$kind" = true ] && echo "the stand-in" || echo "official"))"
  exit 0
fi
if timeout "$PULL_TIMEOUT_S" docker pull -q "$IMAGE" >/dev/null 2>&1; then
  say "pulled the official $IMAGE"
  exit 0
fi
say "cannot pull $IMAGE; building the stand-in (see the header of $0 for how it differs)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || {
    say "installing debootstrap"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
  say "debootstrap bookworm minbase + python3 from $MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -c . | docker import - "$ROOTFS_IMAGE" >/dev/null
  rm -rf "$work/rootfs"
fi

context=$work/context
mkdir -p "$context/wheels"
cp "$HERE/Dockerfile" "$HERE/lambda-entrypoint.sh" "$HERE/bootstrap" "$context/"
cp /etc/ssl/certs/ca-certificates.crt "$context/ca-certificates.crt"
rie=$("$PYTHON" -c 'import pathlib, samcli; print(pathlib.Path(samcli.__file__).parent / "local/rapid/aws-lambda-rie-x86_64")')
cp "$rie" "$context/aws-lambda-rie"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
  --platform manylinux2014_x86_64 -r "$HERE/requirements.txt" -d "$context/wheels"
docker build -q -t "$IMAGE" "$context" >/dev/null
say "built the stand-in $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
