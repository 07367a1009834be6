"""The environment as deployed: variables the template declares empty behave as if they were not set.

template.yaml declares AWS_ENDPOINT_URL_DYNAMODB and AWS_ENDPOINT_URL_LAMBDA with empty values (so that
`sam local invoke --env-vars` may set them; SAM passes only declared variables), and Lambda hands the empty
strings to the function. In the cloud they must change nothing.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from localrun import template as cfn_template
from trainer import config
from trainer.errors import ConfigurationError

REPO_ROOT = Path(__file__).resolve().parents[2]


def deployed_environment() -> dict[str, str]:
    """The trainer's variables as the template deploys them (Globals plus the function's own), intrinsics resolved."""
    template = cfn_template.load_template(REPO_ROOT / "template.yaml")
    variables = {
        **template["Globals"]["Function"]["Environment"]["Variables"],
        **template["Resources"]["TrainerFunction"]["Properties"]["Environment"]["Variables"],
    }
    resolved = {"STATUS_TABLE": "lambdatrain-StatusTable-ABC", "LOG_LEVEL": "INFO"}
    return {name: resolved.get(name, value) for name, value in variables.items()}


def test_template_declares_the_endpoint_variables_empty():
    environ = deployed_environment()

    assert environ["AWS_ENDPOINT_URL_DYNAMODB"] == ""
    assert environ["AWS_ENDPOINT_URL_LAMBDA"] == ""
    assert environ["AWS_ENDPOINT_URL_S3"] == ""


@pytest.mark.parametrize("service", ["dynamodb", "lambda", "s3"])
def test_boto3_uses_the_aws_endpoint_when_the_endpoint_variable_is_empty(monkeypatch, service):
    for name, value in deployed_environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(f"AWS_ENDPOINT_URL_{service.upper()}", "")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    client = boto3.client(
        service, region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )

    assert client.meta.endpoint_url.startswith("https://")
    assert "eu-west-1" in client.meta.endpoint_url


def test_boto3_uses_a_set_endpoint_variable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:8000")

    client = boto3.client(
        "dynamodb", region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )

    assert client.meta.endpoint_url == "http://127.0.0.1:8000"


def test_load_reads_the_deployed_environment():
    environment = config.load(deployed_environment())

    assert environment.efs_root == Path("/mnt/efs")
    assert environment.status_table == "lambdatrain-StatusTable-ABC"
    assert environment.safety_margin_s == config.DEFAULT_SAFETY_MARGIN_S


@pytest.mark.parametrize(
    ("name", "attribute", "default"),
    [
        pytest.param("EFS_ROOT", "efs_root", Path(config.DEFAULT_EFS_ROOT), id="efs-root"),
        pytest.param(
            "SAFETY_MARGIN_S", "safety_margin_s", config.DEFAULT_SAFETY_MARGIN_S, id="safety-margin"
        ),
        pytest.param("AWS_LAMBDA_FUNCTION_NAME", "function_name", "lambdatrain-trainer", id="function-name"),
    ],
)
def test_an_empty_value_is_treated_as_unset(name, attribute, default):
    environment = config.load({"STATUS_TABLE": "table", name: ""})

    assert getattr(environment, attribute) == default


def test_an_empty_status_table_is_a_deployment_error():
    with pytest.raises(ConfigurationError, match="STATUS_TABLE is not set"):
        config.load({"STATUS_TABLE": "", "EFS_ROOT": "/mnt/efs"})


def test_paper_preset_sets_the_papers_rule_and_explicit_keys_win() -> None:
    from trainer.config import PRESETS, TrainConfig

    paper = TrainConfig.from_mapping({"preset": "paper"})
    assert {key: getattr(paper, key) for key in PRESETS["paper"]} == PRESETS["paper"]
    assert (paper.rounds_per_epoch, paper.local_optimizer, paper.outer_momentum) == (1, "reset", 0.0)
    assert TrainConfig.from_mapping({"preset": "paper", "lr": 0.01}).lr == 0.01
    assert paper.preset == "paper"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"preset": "fast"}, "preset must be one of"),
        ({"preset": 3}, "preset must be"),
        ({"local_optimizer": "average"}, "local_optimizer must be one of"),
        ({"warmup_epochs": -1}, "warmup_epochs must be between"),
        ({"warmup_epochs": 20, "epochs": 10}, "warmup_epochs must be between"),
    ],
)
def test_algorithm_keys_are_validated(raw: dict, message: str) -> None:
    from trainer.config import TrainConfig
    from trainer.errors import InvalidEventError

    with pytest.raises(InvalidEventError, match=message):
        TrainConfig.from_mapping(raw)


def test_readme_configuration_table_documents_every_start_event_key() -> None:
    import dataclasses
    import re

    from trainer.config import TrainConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Configuration") : readme.index("<!-- /section:configuration -->")]
    documented = set(re.findall(r"^\| `([a-z_]+)`", section, flags=re.MULTILINE))
    documented |= {"test_samples"} if "`train_samples` / `test_samples`" in section else set()
    documented |= {"train_samples"} if "`train_samples` / `test_samples`" in section else set()
    assert {field.name for field in dataclasses.fields(TrainConfig)} <= documented
