"""Checks against a deployed stack (``make test-integration AWS_SAM_STACK_NAME=<stack>``).

They need AWS credentials and a stack deployed with ``make deploy``; without ``AWS_SAM_STACK_NAME`` they are skipped.
Resources are found through the stack's ``Outputs``. Nothing here trains: the checks cost a few API calls.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest

STACK = os.environ.get("AWS_SAM_STACK_NAME")
pytestmark = [
    pytest.mark.deployed,
    pytest.mark.skipif(not STACK, reason="set AWS_SAM_STACK_NAME to a deployed stack to run these"),
]


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    import boto3

    stack = boto3.client("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]
    return {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}


def invoke(function_name: str, event: dict[str, Any]) -> dict[str, Any]:
    import boto3

    response = boto3.client("lambda").invoke(FunctionName=function_name, Payload=json.dumps(event).encode())
    return {
        "error": response.get("FunctionError"),
        "payload": json.loads(response["Payload"].read() or b"null"),
    }


def test_stack_exports_what_the_tools_use(outputs: dict[str, str]) -> None:
    for key in (
        "BucketName",
        "StatusTableName",
        "TrainerFunctionName",
        "StagingFunctionName",
        "FileSystemId",
    ):
        assert outputs.get(key), f"stack output {key} is missing"


def test_status_table_has_the_key_schema_the_code_uses(outputs: dict[str, str]) -> None:
    import boto3

    from trainer.config import TABLE_KEY_SCHEMA

    table = boto3.client("dynamodb").describe_table(TableName=outputs["StatusTableName"])["Table"]
    assert tuple((key["AttributeName"], key["KeyType"]) for key in table["KeySchema"]) == TABLE_KEY_SCHEMA


def test_trainer_rejects_a_malformed_event_in_the_cloud(outputs: dict[str, str]) -> None:
    result = invoke(outputs["TrainerFunctionName"], {"workerno": 0, "workers": 0})
    assert result["error"] == "Unhandled"
    assert result["payload"]["errorType"] == "InvalidEventError"


def test_trainer_reaches_the_status_table_from_the_vpc(outputs: dict[str, str]) -> None:
    """A stop event for an unknown run reads the table from inside the VPC and answers with a clear error."""
    run_id = f"probe-{uuid.uuid4().hex[:8]}"
    result = invoke(outputs["TrainerFunctionName"], {"stop": True, "run": run_id})
    assert result["error"] == "Unhandled"
    assert "does not exist" in result["payload"]["errorMessage"]
