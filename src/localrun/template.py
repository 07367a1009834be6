"""What the local runtime reads from ``template.yaml``, so that nothing the template declares is restated in code.

- :func:`table_definition`: the status table's ``KeySchema``, ``AttributeDefinitions`` and secondary indexes.
- :func:`function_settings`: the trainer function's ``Timeout``, ``MemorySize`` and ``EventInvokeConfig``
  (retries, and whether failure records travel through SQS), with ``Globals.Function`` and parameter defaults
  resolved.

The template uses CloudFormation's short-form tags (``!Ref``, ``!Sub``, ``!GetAtt`` ...); they load as their
long JSON forms (``{"Ref": ...}``, ``{"Fn::Sub": ...}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from localrun.errors import TemplateError

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
STATUS_TABLE_ID = "StatusTable"
TRAINER_FUNCTION_ID = "TrainerFunction"


class _CloudFormationLoader(yaml.SafeLoader):
    """A safe YAML loader that reads ``!Ref``, ``!Sub``, ``!GetAtt`` ... as their long JSON forms."""


def _construct_intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = tag_suffix if tag_suffix == "Ref" or tag_suffix == "Condition" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if tag_suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CloudFormationLoader.add_multi_constructor("!", _construct_intrinsic)


def load_template(path: Path = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """Parse a CloudFormation/SAM template (short-form intrinsic functions allowed)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise TemplateError(
            f"template {path} not found; the local runtime reads the status table's key schema from it"
        ) from exc
    try:
        # A SafeLoader subclass: plain data only, no arbitrary Python objects.
        template = yaml.load(text, Loader=_CloudFormationLoader)
    except yaml.YAMLError as exc:
        raise TemplateError(f"template {path} is not valid YAML: {exc}") from exc
    if not isinstance(template, dict):
        raise TemplateError(f"template {path} must be a YAML mapping, got {type(template).__name__}")
    return template


def table_definition(template: Mapping[str, Any], logical_id: str = STATUS_TABLE_ID) -> dict[str, Any]:
    """The ``create_table`` arguments (without ``TableName``) declared by the template's table resource."""
    resource = (template.get("Resources") or {}).get(logical_id)
    if not isinstance(resource, Mapping) or resource.get("Type") != "AWS::DynamoDB::Table":
        raise TemplateError(f"template has no AWS::DynamoDB::Table resource named {logical_id!r}")
    properties = resource.get("Properties") or {}
    for key in ("KeySchema", "AttributeDefinitions"):
        if not isinstance(properties.get(key), list) or not properties[key]:
            raise TemplateError(f"{logical_id}.Properties.{key} must be a non-empty list in the template")
    definition: dict[str, Any] = {
        "KeySchema": properties["KeySchema"],
        "AttributeDefinitions": properties["AttributeDefinitions"],
        "BillingMode": "PAY_PER_REQUEST",  # what the table bills locally does not matter; it needs no throughput
    }
    for key in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        if properties.get(key):
            definition[key] = [_index(index) for index in properties[key]]
    _reject_intrinsics(definition, logical_id)
    return definition


def _index(index: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in index.items() if key in ("IndexName", "KeySchema", "Projection")}


def _reject_intrinsics(value: Any, logical_id: str) -> None:
    """The key schema must be literal: a ``!Ref`` there cannot be resolved without deploying."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "Ref" or str(key).startswith("Fn::"):
                raise TemplateError(
                    f"{logical_id}'s key schema uses {key}; the local runtime needs literal values"
                )
            _reject_intrinsics(item, logical_id)
    elif isinstance(value, list):
        for item in value:
            _reject_intrinsics(item, logical_id)


def function_settings(template: Mapping[str, Any], logical_id: str = TRAINER_FUNCTION_ID) -> dict[str, Any]:
    """A function's Timeout, MemorySize and EventInvokeConfig (falling back to ``Globals.Function``), as
    :class:`~localrun.settings.FunctionSettings` field values; what the template does not say (or says with an
    expression) is left out."""
    resource = (template.get("Resources") or {}).get(logical_id)
    if not isinstance(resource, Mapping):
        return {}
    properties = resource.get("Properties") or {}
    globals_ = (template.get("Globals") or {}).get("Function") or {}
    parameters = template.get("Parameters") or {}

    def setting(name: str) -> Any:
        value = properties.get(name, globals_.get(name))
        if isinstance(value, Mapping) and set(value) == {"Ref"}:  # a parameter: its default
            value = (parameters.get(value["Ref"]) or {}).get("Default")
        return None if isinstance(value, Mapping | list) else value

    invoke_config = properties.get("EventInvokeConfig") or {}
    retries = invoke_config.get("MaximumRetryAttempts")
    on_failure = ((invoke_config.get("DestinationConfig") or {}).get("OnFailure") or {}).get("Type")
    timeout, memory = setting("Timeout"), setting("MemorySize")
    declared = {
        "timeout_s": float(timeout) if timeout is not None else None,
        "memory_mb": int(memory) if memory is not None else None,
        "maximum_retry_attempts": retries if isinstance(retries, int) else None,
        "failure_destination": str(on_failure).lower() if on_failure in ("SQS", "Lambda") else None,
    }
    return {name: value for name, value in declared.items() if value is not None}
