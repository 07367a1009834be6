#!/bin/sh
# The stand-in's entry point, after the real base's /lambda-entrypoint.sh: the handler is the only argument.
# Under Lambda (and under `sam local invoke`, whose emulator sets AWS_LAMBDA_RUNTIME_API) it starts the
# runtime client; with plain `docker run` it starts the runtime interface emulator, listening on :8080.
if [ $# -ne 1 ]; then
  echo "entrypoint requires the handler name to be the first argument" 1>&2
  exit 142
fi
export _HANDLER="$1"

RUNTIME_ENTRYPOINT=/var/runtime/bootstrap
if [ -z "${AWS_LAMBDA_RUNTIME_API}" ]; then
  exec /usr/local/bin/aws-lambda-rie "$RUNTIME_ENTRYPOINT"
else
  exec "$RUNTIME_ENTRYPOINT"
fi
