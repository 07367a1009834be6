"""The template gate passes on template.yaml and fails, with the expected line, on broken copies of it.

Each broken copy changes one piece of the real template's text (so CloudFormation tags survive) and runs
only the gate step that should catch it: the structural assertions take about a second, the full gate
(sam, cfn-lint, checkov, hadolint, pip) about 15 s and runs once.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "template.yaml"


def _load_gate():
    spec = importlib.util.spec_from_file_location("template_gate", REPO_ROOT / "tools" / "template_gate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["template_gate"] = module
    spec.loader.exec_module(module)
    return module


template_gate = _load_gate()


def make_project(tmp_path: Path, template_text: str) -> Path:
    """A project directory holding ``template_text`` whose relative paths (src/...) reach the real sources."""
    (tmp_path / "src").symlink_to(REPO_ROOT / "src", target_is_directory=True)
    path = tmp_path / "template.yaml"
    path.write_text(template_text)
    return path


def broken_copy(tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    text = TEMPLATE.read_text()
    found = text.count(old)
    assert found == count, f"expected {count} occurrence(s) of {old!r} in template.yaml, found {found}"
    return make_project(tmp_path, text.replace(old, new))


def run_gate(capsys, template: Path, *args: str) -> tuple[int, str]:
    status = template_gate.main(["--template", str(template), *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.registry  # the gate's pip step resolves the image's requirements against PyPI
def test_real_template_passes_the_whole_gate(capsys):
    status, output = run_gate(capsys, TEMPLATE)

    assert status == 0, output
    assert "template gate passed: sam, cfnlint, checkov, hadolint, pip, asserts" in output


BROKEN_ASSERTIONS = [
    pytest.param(
        "          MODEL_BUCKET: !Sub\n",
        "          MODEL_BUCKETS: !Sub\n",
        "TrainerFunction: environment variable MODEL_BUCKET is not set",
        id="model-bucket-unset",
    ),
    pytest.param(
        'MODEL_BUCKET: !Sub\n            - "lambdatrain-${StackUuid}"',
        'MODEL_BUCKET: !Sub\n            - "lambdatrain-models-${StackUuid}"',
        "which is no bucket's BucketName in the template",
        id="model-bucket-not-the-stacks-bucket",
    ),
    pytest.param(
        '            Resource: !Sub "${DatasetBucket.Arn}/models/*"\n',
        '            Resource: !Sub "${DatasetBucket.Arn}/model/*"\n',
        'does not grant s3:PutObject on {"Fn::Sub": "${DatasetBucket.Arn}/models/*"}',
        id="model-upload-not-granted",
    ),
    pytest.param(
        "    Condition: UseDashboard\n    Properties:\n",
        "    Properties:\n",
        "TrainingDashboard: Condition is None",
        id="dashboard-not-optional",
    ),
    pytest.param(
        '["lambdatrain", "worker_load", "FunctionName"',
        '["lambdatrain", "worker_load_s", "FunctionName"',
        "TrainingDashboard: does not plot ['worker_load'] in namespace 'lambdatrain'",
        id="dashboard-misses-a-metric",
    ),
    pytest.param(
        "  EnableDashboard:\n    Type: String\n",
        "  EnableDashboards:\n    Type: String\n",
        "no EnableDashboard parameter",
        id="dashboard-parameter-missing",
    ),
    pytest.param(
        "      DisplayName: lambdatrain alarms\n",
        "      DisplayName: lambdatrain alarms\n      KmsMasterKeyId: alias/aws/sns\n",
        "DeadLetterAlarm: notifies AlarmTopic, encrypted with alias/aws/sns",
        id="alarm-topic-managed-key",
    ),
    pytest.param(
        "              Action: lambda:GetFunctionConcurrency\n",
        "              Action: lambda:GetFunctionConfiguration\n",
        "lacks lambda:GetFunctionConcurrency",
        id="own-concurrency-not-readable",
    ),
    pytest.param(
        '          FUNCTION_TIMEOUT_S: "900"\n',
        '          FUNCTION_TIMEOUT_S: "60"\n',
        "TrainerFunction: FUNCTION_TIMEOUT_S is '60' but Timeout is 900",
        id="watchdog-timeout-mismatch",
    ),
    pytest.param(
        """            Input: '{"watchdog": true}'\n""",
        """            Input: '{"watchdog": 1}'\n""",
        "TrainerFunction: no schedule sends the watchdog event",
        id="watchdog-input-invalid",
    ),
    pytest.param(
        "        - IndexName: ActiveRuns\n",
        "        - IndexName: Active\n",
        "StatusTable: no index 'ActiveRuns' keyed on 'active'",
        id="active-index-missing",
    ),
    pytest.param(
        "            - AttributeName: created_at\n              KeyType: RANGE\n",
        "",
        "StatusTable: no index 'Runs' keyed on kind (HASH) and created_at (RANGE) projecting ALL",
        id="runs-index-unsorted",
    ),
    pytest.param(
        "    Timeout: 900\n",
        "    Timeout: 901\n",
        "TrainerFunction: Timeout is 901; expected 1 to 900",
        id="timeout-901",
    ),
    pytest.param(
        "      MemorySize: 2048\n",
        "      MemorySize: 20000\n",
        "StagingFunction: MemorySize is 20000; expected 128 to 10240",
        id="memory-20000",
    ),
    pytest.param(
        "    Default: 10240\n    MinValue: 1024\n    MaxValue: 10240\n",
        "    Default: 10240\n    MinValue: 1024\n    MaxValue: 20000\n",
        "TrainerFunction: MemorySize (parameter MemorySize MaxValue) is 20000; expected 128 to 10240",
        id="memory-parameter-max-20000",
    ),
    pytest.param(
        "          LocalMountPath: /mnt/efs\n      ReservedConcurrentExecutions",
        "          LocalMountPath: /efs\n      ReservedConcurrentExecutions",
        "TrainerFunction: LocalMountPath '/efs' must be /mnt/<name>",
        id="mount-path-outside-mnt",
    ),
    pytest.param(
        "    DependsOn: [MountTargetA, MountTargetB]\n    Metadata:\n      DockerContext",
        "    DependsOn: [MountTargetA]\n    Metadata:\n      DockerContext",
        "TrainerFunction: DependsOn lacks mount target(s) ['MountTargetB']",
        id="mount-target-missing-from-depends-on",
    ),
    pytest.param(
        "          ToPort: 2049\n          SourceSecurityGroupId: !Ref FunctionSecurityGroup\n",
        "          ToPort: 2049\n          CidrIp: 0.0.0.0/0\n",
        "EfsSecurityGroup.SecurityGroupIngress[0]: NFS (port 2049) is open to '0.0.0.0/0'",
        id="nfs-open-to-the-world",
    ),
    pytest.param(
        "        MaximumRetryAttempts: 0\n",
        "        MaximumRetryAttempts: 5\n",
        "TrainerFunctionEventInvokeConfig: MaximumRetryAttempts is 5; expected 0 to 2",
        id="retry-attempts-5",
    ),
    pytest.param(
        "          STATUS_TABLE: !Ref StatusTable\n          TF_ENABLE_ONEDNN_OPTS",
        "          TF_ENABLE_ONEDNN_OPTS",
        "TrainerFunction: environment variable STATUS_TABLE is not set",
        id="status-table-env-missing",
    ),
    pytest.param(
        "          KeyType: HASH\n        - AttributeName: sk\n          KeyType: RANGE\n",
        "          KeyType: RANGE\n        - AttributeName: sk\n          KeyType: HASH\n",
        "StatusTable: KeySchema is (('pk', 'RANGE'), ('sk', 'HASH')); trainer.config.TABLE_KEY_SCHEMA is",
        id="key-schema-swapped",
    ),
    pytest.param(
        "              Action: lambda:InvokeFunction\n",
        "              Action: lambda:*\n",
        "statement InvokeItself: wildcard action 'lambda:*'",
        id="wildcard-action",
    ),
    pytest.param(
        "      EventSourceArn: !GetAtt FailureQueue.Arn\n      BatchSize: 1\n      Enabled: true\n",
        "      EventSourceArn: !GetAtt FailureQueue.Arn\n      BatchSize: 1\n      Enabled: false\n",
        "TrainerFunction: OnFailure destination",
        id="failure-records-not-consumed",
    ),
    pytest.param(
        "                    Value: start/\n",
        "                    Value: begin/\n",
        "TrainerFunction: no S3 notification for {'prefix': 'start/', 'suffix': '.json'}",
        id="start-prefix-differs-from-protocol",
    ),
    pytest.param(
        "    DeletionPolicy: Retain\n    UpdateReplacePolicy: Retain\n    Properties:\n      Encrypted: true\n",
        "    Properties:\n      Encrypted: true\n",
        "FileSystem: DeletionPolicy is None; expected Retain",
        id="efs-not-retained",
    ),
    pytest.param(
        "    ConstraintDescription: an integer from 1 to 256 (trainer.protocol.MAX_WORKERS).\n",
        "",
        "Parameters.NumWorkers: missing ['ConstraintDescription']",
        id="parameter-without-constraint-description",
    ),
    pytest.param(
        "        - Description: NFS from the functions security group only\n",
        "        - Description: NFS from the functions' security group\n",
        'EfsSecurityGroup.SecurityGroupIngress[0]: Description "NFS from the functions\' security group" contains ["\'"]',
        id="apostrophe-in-inline-rule-description",
    ),
    pytest.param(
        "      Description: NFS to the EFS mount targets\n",
        "      Description: NFS to the EFS mount targets & back\n",
        "FunctionToEfsEgress: Description 'NFS to the EFS mount targets & back' contains ['&']",
        id="ampersand-in-separate-rule-description",
    ),
    pytest.param(
        "      GroupDescription: EFS mount targets - NFS from the lambdatrain functions only\n",
        "      GroupDescription: EFS mount targets \u2014 NFS from the lambdatrain functions only\n",
        "EfsSecurityGroup: GroupDescription 'EFS mount targets \u2014 NFS from the lambdatrain functions only' contains ['\u2014']",
        id="dash-in-group-description",
    ),
    pytest.param(
        "      GroupDescription: HTTPS to the Lambda API endpoint from the functions only\n",
        "      GroupDescription: HTTPS to the Lambda API endpoint from the functions only"
        + " x" * 100
        + "\n",
        "LambdaEndpointSecurityGroup: GroupDescription is 256 characters; EC2 allows 255",
        id="group-description-too-long",
    ),
    pytest.param(
        "      VisibilityTimeout: 5400\n",
        "      VisibilityTimeout: 960\n",
        "FailureQueue: VisibilityTimeout is 960 s; FailureRecordMapping feeds it to TrainerFunction (timeout 900 s) "
        "and AWS requires at least 6 x 900 = 5400 s",
        id="visibility-timeout-below-6x",
    ),
    pytest.param(
        "                - dynamodb:UpdateItem\n                - dynamodb:Query\n",
        "                - dynamodb:UpdateItem\n                - dynamodb:Query\n                - dynamodb:DeleteItem\n",
        "grants DynamoDB actions ['dynamodb:DeleteItem', 'dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:Query', "
        "'dynamodb:UpdateItem']; the trainer calls exactly",
        id="dynamodb-action-the-trainer-never-calls",
    ),
    pytest.param(
        "                - dynamodb:UpdateItem\n",
        "",
        "the trainer calls exactly ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:Query', 'dynamodb:UpdateItem']",
        id="dynamodb-action-missing",
    ),
    pytest.param(
        "              - s3:AbortMultipartUpload\n",
        "",
        "statement WriteModels: grants s3:PutObject without s3:AbortMultipartUpload",
        id="multipart-upload-cannot-abort",
    ),
    pytest.param(
        "        - Statement:\n            - Sid: ReadConcurrencyQuota\n              Effect: Allow\n"
        '              Action: lambda:GetAccountSettings\n              Resource: "*"\n',
        "",
        "lacks lambda:GetAccountSettings",
        id="no-quota-read-permission",
    ),
    pytest.param(
        "              Action: lambda:GetAccountSettings\n",
        "              Action: [lambda:GetAccountSettings, lambda:ListFunctions]\n",
        "statement ReadConcurrencyQuota: Resource '*'; name the resources",
        id="resource-star-beyond-resourceless-actions",
    ),
    pytest.param(
        "        LogGroup: !Ref StagingLogGroup\n        LogFormat: JSON\n",
        "        LogGroup: !Ref StagingLogGroup\n",
        "StagingFunction: LoggingConfig.LogFormat is None; expected JSON",
        id="staging-logs-text",
    ),
    pytest.param(
        '          AWS_ENDPOINT_URL_LAMBDA: ""\n',
        "",
        "TrainerFunction: environment variable AWS_ENDPOINT_URL_LAMBDA is not declared",
        id="local-override-undeclared",
    ),
    pytest.param(
        '          AWS_ENDPOINT_URL_DYNAMODB: ""\n',
        '          AWS_ENDPOINT_URL_DYNAMODB: "http://127.0.0.1:8000"\n',
        "TrainerFunction: AWS_ENDPOINT_URL_DYNAMODB is 'http://127.0.0.1:8000'; expected ''",
        id="endpoint-set-in-the-cloud",
    ),
    pytest.param(
        "            comment: Access logging needs a second bucket; CloudTrail data events cover audits where required.\n",
        "",
        "DatasetBucket: checkov skip {'id': 'CKV_AWS_18'} has no comment",
        id="checkov-skip-without-reason",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), BROKEN_ASSERTIONS)
def test_broken_copy_fails_the_assertions(tmp_path, capsys, old, new, expected):
    template = broken_copy(tmp_path, old, new)

    status, output = run_gate(capsys, template, "--only", "asserts")

    assert status == 1
    assert any(line.startswith("FAIL asserts: ") and expected in line for line in output.splitlines()), output


def test_the_copy_helper_keeps_a_passing_template_passing(tmp_path, capsys):
    template = make_project(tmp_path, TEMPLATE.read_text())

    status, output = run_gate(capsys, template, "--only", "asserts")

    assert status == 0, output


def test_bucket_named_in_the_trainer_policies_is_a_cycle_cfn_lint_catches(tmp_path, capsys):
    # The bucket's notification depends on the function; naming the bucket in the function's own policies
    # makes the role depend on the bucket: bucket -> function -> role -> bucket.
    template = broken_copy(
        tmp_path,
        "            - Sid: InvokeItself\n",
        "            - Sid: ReadStart\n              Effect: Allow\n              Action: s3:GetObject\n"
        '              Resource: !Sub "${DatasetBucket.Arn}/start/*"\n            - Sid: InvokeItself\n',
    )

    status, output = run_gate(capsys, template, "--only", "cfnlint")

    assert status == 1
    assert "FAIL cfnlint: E3004" in output, output
    assert "Circular Dependencies" in output


def test_model_bucket_by_ref_is_a_cycle_cfn_lint_catches(tmp_path, capsys):
    # Why MODEL_BUCKET spells the bucket's fixed name instead of !Ref DatasetBucket.
    template = broken_copy(
        tmp_path,
        'MODEL_BUCKET: !Sub\n            - "lambdatrain-${StackUuid}"\n'
        '            - StackUuid: !Select [2, !Split ["/", !Ref AWS::StackId]]\n',
        "MODEL_BUCKET: !Ref DatasetBucket\n",
    )

    status, output = run_gate(capsys, template, "--only", "cfnlint")

    assert status == 1
    assert "FAIL cfnlint: E3004" in output, output


def test_file_system_configs_in_globals_fail_sam_validate_lint_and_plain_cfn_lint(tmp_path, capsys):
    # The SAM translator accepts FileSystemConfigs in Globals; cfn-lint's SAM schema does not (E3724), so
    # `sam validate --lint` and `cfn-lint template.yaml` fail while plain `sam validate` passes.
    text = TEMPLATE.read_text()
    mount = (
        "      # Per function, not in Globals: cfn-lint's SAM schema (sam validate --lint) rejects it there (E3724).\n"
        "      FileSystemConfigs:\n        - Arn: !GetAtt AccessPoint.Arn\n          LocalMountPath: /mnt/efs\n"
    )
    assert text.count(mount) == 2
    text = text.replace(mount, "").replace(
        "    Environment:\n      Variables:\n        EFS_ROOT: /mnt/efs\n",
        "    FileSystemConfigs:\n      - Arn: !GetAtt AccessPoint.Arn\n        LocalMountPath: /mnt/efs\n"
        "    Environment:\n      Variables:\n        EFS_ROOT: /mnt/efs\n",
    )
    template = make_project(tmp_path, text)

    status, output = run_gate(capsys, template, "--only", "sam,cfnlint")

    assert status == 1
    assert "FAIL sam: sam validate --lint:" in output, output
    assert "E3724" in output
    assert "FAIL sam: sam validate:" not in output
    assert "FAIL cfnlint: E3724" in output and "(template)" in output


def test_trainer_dynamodb_actions_are_read_from_its_code(tmp_path):
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    (trainer / "a.py").write_text("table.get_item(Key=k)\nself._conditional('update_item', **kwargs)\n")
    (trainer / "b.py").write_text("page = self.table.query(**kwargs)\n# a scan would be slow\n")

    actions = template_gate.dynamodb_actions_called(trainer)

    assert actions == {"dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"}


def test_invalid_sam_property_fails_sam_validate(tmp_path, capsys):
    template = broken_copy(tmp_path, "            Type: SQS\n", "            Type: Kinesis\n")

    status, output = run_gate(capsys, template, "--only", "sam")

    assert status == 1
    assert "FAIL sam: sam validate:" in output, output
    assert "Kinesis" in output


def test_unencrypted_table_fails_checkov(tmp_path, capsys):
    template = broken_copy(
        tmp_path,
        "      PointInTimeRecoverySpecification:\n        PointInTimeRecoveryEnabled: true\n",
        "",
    )

    status, output = run_gate(capsys, template, "--only", "checkov")

    assert status == 1
    assert "FAIL checkov: CKV_AWS_28 AWS::DynamoDB::Table.StatusTable (template)" in output, output


def test_broken_dockerfile_fails_hadolint_and_the_image_contract(tmp_path, capsys):
    handler = tmp_path / "src" / "handler"
    handler.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "src" / "handler" / "requirements.txt", handler)
    (tmp_path / "src" / "prep").mkdir()
    (handler / "Dockerfile").write_text(
        "FROM public.ecr.aws/lambda/python:3.9\n"
        "COPY requirements.txt ./\n"
        "RUN pip install -r requirements.txt\n"
        "COPY app.py trainer/ ./\n"
        'CMD ["main.handler"]\n'
    )
    template = tmp_path / "template.yaml"
    template.write_text(TEMPLATE.read_text())

    status, output = run_gate(capsys, template, "--only", "hadolint,asserts")

    assert status == 1
    assert "FAIL hadolint:" in output and "DL3042" in output, output  # pip install without --no-cache-dir
    assert "is not public.ecr.aws/lambda/python:3.12 or :3.13" in output
    assert "CMD is ['main.handler']" in output
    assert "does not set ENV TF_ENABLE_ONEDNN_OPTS=1" in output


@pytest.mark.parametrize(
    ("requirements_in", "requirements_txt", "expected"),
    [
        pytest.param(False, None, "no requirements.in next to it", id="no-input-file"),
        pytest.param(
            True, "numpy==2.4.6\nurllib3==1.26.20\n", "not generated by `make lock`", id="edited-by-hand"
        ),
    ],
)
def test_image_requirements_must_come_from_make_lock(
    tmp_path, capsys, requirements_in, requirements_txt, expected
):
    handler = tmp_path / "src" / "handler"
    shutil.copytree(REPO_ROOT / "src" / "handler", handler, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "src" / "prep").mkdir()
    if not requirements_in:
        (handler / "requirements.in").unlink()
    if requirements_txt is not None:
        (handler / "requirements.txt").write_text(requirements_txt)
    template = tmp_path / "template.yaml"
    template.write_text(TEMPLATE.read_text())

    status, output = run_gate(capsys, template, "--only", "asserts")

    assert status == 1
    assert f"FAIL asserts: requirements.txt: {expected}" in output, output


def test_lock_header_is_what_the_lock_tool_writes():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import lock_requirements

    assert lock_requirements.render([("numpy", "2.4.6")]).startswith(template_gate.LOCK_HEADER)


def test_unpinned_requirement_fails_the_pip_step_before_resolving(tmp_path, capsys):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy==2.4.6\nkeras>=3\n")

    pins, loose = template_gate.read_pins(requirements)

    assert pins == {"numpy": "2.4.6"}
    assert loose == ["keras>=3"]


def test_unknown_step_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        template_gate.main(["--only", "docker"])

    assert excinfo.value.code == 2
    assert "unknown step(s) ['docker']" in capsys.readouterr().err
