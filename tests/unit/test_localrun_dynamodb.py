"""DynamoDB Local's lifecycle, and tables built from the template's key schema."""

from __future__ import annotations

import os
import re
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

from localrun import dynamodb_local as dynamodb_local_module
from localrun import template
from localrun.errors import DynamoDBLocalError, TemplateError

# A template in the style of template.yaml: short-form intrinsics everywhere, a key schema that is not pk/sk.
TEMPLATE = textwrap.dedent(
    """\
    AWSTemplateFormatVersion: "2010-09-09"
    Transform: AWS::Serverless-2016-10-31
    Conditions:
      IsProd: !Equals [!Ref Stage, prod]
    Resources:
      Bucket:
        Type: AWS::S3::Bucket
        Properties:
          BucketName: !Sub "${AWS::StackName}-data"
      StatusTable:
        Type: AWS::DynamoDB::Table
        Properties:
          TableName: !Sub "${AWS::StackName}-status"
          BillingMode: PAY_PER_REQUEST
          AttributeDefinitions:
            - {AttributeName: run, AttributeType: S}
            - {AttributeName: step, AttributeType: N}
            - {AttributeName: state, AttributeType: S}
          KeySchema:
            - {AttributeName: run, KeyType: HASH}
            - {AttributeName: step, KeyType: RANGE}
          GlobalSecondaryIndexes:
            - IndexName: by-state
              KeySchema: [{AttributeName: state, KeyType: HASH}]
              Projection: {ProjectionType: KEYS_ONLY}
          SSESpecification:
            SSEEnabled: !If [IsProd, true, false]
      Function:
        Type: AWS::Serverless::Function
        Properties:
          Role: !GetAtt Role.Arn
          Environment:
            Variables:
              STATUS_TABLE: !Ref StatusTable
    """
)


def write_template(tmp_path: Path, text: str = TEMPLATE) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text(text)
    return path


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.mark.java
def test_lifecycle_on_disk_keeps_tables_across_restarts_and_leaves_no_process(tmp_path: Path) -> None:
    template = write_template(tmp_path)
    with dynamodb_local_module.DynamoDBLocal(db_path=tmp_path / "db") as database:
        pid = database.pid
        assert database.endpoint_url.startswith("http://127.0.0.1:")
        assert dynamodb_local_module.create_table(database.client(), "status", template) is True
        database.resource().Table("status").put_item(Item={"run": "r1", "step": 1})
    assert pid is not None and not process_exists(pid)

    with dynamodb_local_module.DynamoDBLocal(db_path=tmp_path / "db") as database:
        assert dynamodb_local_module.create_table(database.client(), "status", template) is False
        item = database.resource().Table("status").get_item(Key={"run": "r1", "step": 1})["Item"]
    assert item == {"run": "r1", "step": 1}


def test_table_is_created_with_the_template_key_schema_and_indexes(
    dynamodb_local: dynamodb_local_module.DynamoDBLocal, tmp_path: Path
) -> None:
    client = dynamodb_local.client()

    created = dynamodb_local_module.create_table(client, "from-template", write_template(tmp_path))
    description = client.describe_table(TableName="from-template")["Table"]
    client.delete_table(TableName="from-template")

    assert created
    assert description["KeySchema"] == [
        {"AttributeName": "run", "KeyType": "HASH"},
        {"AttributeName": "step", "KeyType": "RANGE"},
    ]
    assert {(a["AttributeName"], a["AttributeType"]) for a in description["AttributeDefinitions"]} == {
        ("run", "S"),
        ("step", "N"),
        ("state", "S"),
    }
    assert [index["IndexName"] for index in description["GlobalSecondaryIndexes"]] == ["by-state"]


def test_table_fixture_follows_the_repository_template(table: Any) -> None:
    from trainer import config

    declared = template.table_definition(template.load_template())
    description = table.meta.client.describe_table(TableName=table.name)["Table"]

    assert description["KeySchema"] == declared["KeySchema"]
    assert (
        tuple((key["AttributeName"], key["KeyType"]) for key in declared["KeySchema"])
        == config.TABLE_KEY_SCHEMA
    )


def test_stop_is_safe_twice_and_endpoint_needs_a_running_instance() -> None:
    database = dynamodb_local_module.DynamoDBLocal()
    database.stop()
    database.stop()

    with pytest.raises(DynamoDBLocalError, match="not running; call start"):
        _ = database.endpoint_url


def test_missing_jar_says_to_run_make_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dynamodb_local_module.ENV_JAR, raising=False)

    with pytest.raises(DynamoDBLocalError, match=r"DynamoDB Local is not installed .*; run `make install`"):
        dynamodb_local_module.find_jar(tmp_path / "nowhere")


def test_missing_java_says_how_to_install_it() -> None:
    database = dynamodb_local_module.DynamoDBLocal(java="no-such-java-binary")

    with pytest.raises(DynamoDBLocalError, match=r"java not found .*install Java 17\+"):
        database.start()


def test_java_that_fails_to_start_shows_the_tail_of_its_output(tmp_path: Path) -> None:
    fake_java = tmp_path / "java"
    fake_java.write_text(
        "#!/bin/sh\necho 'starting'\necho 'Error: UnsupportedClassVersionError' >&2\nexit 1\n"
    )
    fake_java.chmod(fake_java.stat().st_mode | stat.S_IEXEC)
    jar = tmp_path / "DynamoDBLocal.jar"
    jar.write_bytes(b"")

    with pytest.raises(
        DynamoDBLocalError, match=r"exited with status 1 .*starting \| Error: UnsupportedClassVersion"
    ):
        dynamodb_local_module.DynamoDBLocal(java=str(fake_java), jar=jar).start()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "not found; the local runtime reads the status table's key schema from it"),
        ("Resources: [unclosed", "is not valid YAML"),
        (
            "Resources:\n  Other: {Type: AWS::S3::Bucket}\n",
            "no AWS::DynamoDB::Table resource named 'StatusTable'",
        ),
        (
            "Resources:\n  StatusTable:\n    Type: AWS::DynamoDB::Table\n    Properties: {KeySchema: []}\n",
            "StatusTable.Properties.KeySchema must be a non-empty list",
        ),
        (
            "Resources:\n  StatusTable:\n    Type: AWS::DynamoDB::Table\n    Properties:\n"
            "      AttributeDefinitions: [{AttributeName: pk, AttributeType: S}]\n"
            "      KeySchema: [{AttributeName: !Ref KeyName, KeyType: HASH}]\n",
            "key schema uses Ref",
        ),
    ],
    ids=["missing-file", "bad-yaml", "no-status-table", "empty-key-schema", "intrinsic-in-key-schema"],
)
def test_template_problems_are_clear_errors(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "template.yaml" if text is None else write_template(tmp_path, text)

    with pytest.raises(TemplateError, match=message):
        template.table_definition(template.load_template(path))


def test_intrinsic_functions_load_as_their_long_form(tmp_path: Path) -> None:
    loaded = template.load_template(write_template(tmp_path))

    assert loaded["Resources"]["Function"]["Properties"]["Role"] == {"Fn::GetAtt": ["Role", "Arn"]}
    assert loaded["Conditions"]["IsProd"] == {"Fn::Equals": [{"Ref": "Stage"}, "prod"]}
    assert loaded["Resources"]["Bucket"]["Properties"]["BucketName"] == {"Fn::Sub": "${AWS::StackName}-data"}


def test_function_settings_come_from_the_function_its_globals_and_parameter_defaults() -> None:
    declared = {
        "Parameters": {"Memory": {"Type": "Number", "Default": 3008}},
        "Globals": {"Function": {"Timeout": 600, "MemorySize": {"Ref": "Memory"}}},
        "Resources": {
            "TrainerFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "Timeout": 120,
                    "EventInvokeConfig": {
                        "MaximumRetryAttempts": 1,
                        "DestinationConfig": {"OnFailure": {"Type": "Lambda", "Destination": {"Ref": "X"}}},
                    },
                },
            }
        },
    }

    assert template.function_settings(declared) == {
        "timeout_s": 120.0,
        "memory_mb": 3008,
        "maximum_retry_attempts": 1,
        "failure_destination": "lambda",
    }
    assert template.function_settings({"Resources": {}}) == {}


def test_repository_template_declares_every_setting_the_local_runtime_reads() -> None:
    settings = template.function_settings(template.load_template())

    # nothing falls back to a built-in default
    assert set(settings) == {"timeout_s", "memory_mb", "maximum_retry_attempts", "failure_destination"}


@pytest.mark.java
def test_one_instance_per_folder_and_the_running_one_is_found(tmp_path: Path) -> None:
    db_path = tmp_path / "db"
    assert dynamodb_local_module.running_server(db_path) is None
    with dynamodb_local_module.DynamoDBLocal(db_path=db_path) as database:
        server = dynamodb_local_module.running_server(db_path)
        assert server == dynamodb_local_module.RunningServer(database.endpoint_url, database.pid, os.getpid())
        with pytest.raises(
            DynamoDBLocalError, match=f"already served by DynamoDB Local at {database.endpoint_url}"
        ):
            dynamodb_local_module.DynamoDBLocal(db_path=db_path).start()
    assert dynamodb_local_module.running_server(db_path) is None  # the file stays, unlocked and empty


def test_indexes_the_template_added_later_are_added_to_an_existing_table(
    dynamodb_local: dynamodb_local_module.DynamoDBLocal, tmp_path: Path
) -> None:
    client = dynamodb_local.client()
    older = re.sub(r" *- \{AttributeName: state, AttributeType: S\}\n", "", TEMPLATE)
    older = older.replace("GlobalSecondaryIndexes:", "Unused:")
    dynamodb_local_module.create_table(client, "older", write_template(tmp_path, older))
    try:
        added = dynamodb_local_module.add_missing_indexes(client, "older", write_template(tmp_path))
        again = dynamodb_local_module.add_missing_indexes(client, "older", write_template(tmp_path))
        indexes = client.describe_table(TableName="older")["Table"]["GlobalSecondaryIndexes"]
    finally:
        client.delete_table(TableName="older")
    assert (added, again) == (["by-state"], [])
    assert [index["IndexName"] for index in indexes] == ["by-state"]
