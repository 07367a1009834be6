"""The environment of handler processes, and settings for boto3 clients that talk to the local stand-ins.

The handler has no "local" branch: boto3 reads ``AWS_ENDPOINT_URL_LAMBDA`` / ``AWS_ENDPOINT_URL_DYNAMODB`` and
finds the local Invoke API and DynamoDB Local; the EFS mount is the folder in ``EFS_ROOT``. Credentials are
dummies (neither stand-in checks them) so that no real AWS credential ever reaches a local process.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer import config

REGION = "us-east-1"
ACCESS_KEY_ID = "localrun"
SECRET_ACCESS_KEY = "localrun"

# Variables a handler process must not inherit from the caller's shell: real credentials and settings that
# would make boto3 ignore the local endpoints or pick another account.
UNSET_FOR_HANDLER = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_LAMBDA_RUNTIME_API",
)


def handler_environment(
    *,
    function_name: str,
    efs_root: Path,
    status_table: str,
    lambda_endpoint_url: str,
    dynamodb_endpoint_url: str,
    memory_mb: int,
    timeout_s: float = config.DEFAULT_FUNCTION_TIMEOUT_S,
    log_level: str = "INFO",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What Lambda and the template would set for the trainer, pointed at the local stand-ins.

    ``extra`` (the caller's own variables) is applied last and may override anything.
    """
    environment = {
        "EFS_ROOT": str(Path(efs_root).resolve()),
        "STATUS_TABLE": status_table,
        "AWS_LAMBDA_FUNCTION_NAME": function_name,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "AWS_ENDPOINT_URL_LAMBDA": lambda_endpoint_url,
        "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_endpoint_url,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        config.ENV_ONEDNN: config.TENSORFLOW_ENVIRONMENT[config.ENV_ONEDNN],
        config.ENV_FUNCTION_TIMEOUT_S: f"{timeout_s:g}",
        "LOG_LEVEL": log_level,
        "PYTHONUNBUFFERED": "1",
    }
    environment.update(extra or {})
    return environment


def client_settings(endpoint_url: str) -> dict[str, Any]:
    """Keyword arguments for ``boto3.client(...)`` / ``boto3.resource(...)`` aimed at a local endpoint."""
    return {
        "endpoint_url": endpoint_url,
        "region_name": REGION,
        "aws_access_key_id": ACCESS_KEY_ID,
        "aws_secret_access_key": SECRET_ACCESS_KEY,
    }
