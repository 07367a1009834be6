"""The template gate: prove ``template.yaml`` and the trainer image deploy as intended, without AWS or Docker.

Steps, in the order they run (select with ``--only`` / ``--skip``):

==========  ======================================================================================
sam         ``sam validate --region us-east-1``: the SAM translator's own checks
cfnlint     cfn-lint on the template after the SAM translation (cfn-lint >= 1.54 no longer
            transforms SAM templates itself, so cycles and property ranges need this)
checkov     checkov on the template and its translation: zero failed checks
hadolint    hadolint on the trainer's Dockerfile
pip         the image's pinned requirements resolve for its platform (wheels only; needs PyPI)
asserts     what the linters cannot know: Lambda limits, the EFS mount and its security group,
            retries, the handler's environment and table keys, IAM wildcards, parameter
            constraints, outputs, the Dockerfile's contract
==========  ======================================================================================

Each failure prints one line, ``FAIL <step>: <what>``; the exit status is 1 when any step failed.
Paths in the template (``DockerContext``, ``CodeUri``) are resolved from the template's directory,
as ``sam build`` does.

    .venv/bin/python tools/template_gate.py                  # everything (about 20 s)
    .venv/bin/python tools/template_gate.py --only asserts   # the fast structural checks
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "src" / "handler"), str(REPO_ROOT / "src")]

from localrun import template as cfn_template  # noqa: E402
from trainer import config as trainer_config  # noqa: E402  (needs the sys.path entry above)
from trainer import coordination as trainer_coordination  # noqa: E402
from trainer import embedded_metrics as trainer_metrics  # noqa: E402
from trainer import protocol as trainer_protocol  # noqa: E402

STEPS = ("sam", "cfnlint", "checkov", "hadolint", "pip", "asserts")
REGION = "us-east-1"
PLACEHOLDER_IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/placeholder:latest"
PLACEHOLDER_CODE_URI = "s3://placeholder-bucket/placeholder.zip"

LAMBDA_MAX_TIMEOUT_S = 900
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10240
LAMBDA_MAX_EPHEMERAL_MB = 10240
MAX_RETRY_ATTEMPTS = 2  # the trainer re-dispatches failures itself; Lambda's own retries must stay few
NFS_PORT = 2049
MOUNT_PATH_PATTERN = re.compile(r"^/mnt/[A-Za-z0-9_.\-]+$")
BASE_IMAGE_PATTERN = re.compile(
    r"^public\.ecr\.aws/lambda/python:(3)\.(12|13)(?:[.\-][\w.\-]*)?(?:@sha256:[0-9a-f]{64})?$"
)
ALLOWED_MANAGED_POLICIES = {
    "AWSLambdaBasicExecutionRole",  # logs
    "AWSLambdaVPCAccessExecutionRole",  # the function's ENIs in the VPC
}
# EC2's character sets (CreateSecurityGroup, and IpRange/UserIdGroupPair descriptions of rules): anything
# else fails at deploy time with InvalidParameterValue and rolls the stack back; no linter checks it.
# Rule descriptions do not allow "&" (the API reference lists it for group descriptions only).
GROUP_DESCRIPTION_PATTERN = re.compile(r"^[a-zA-Z0-9 ._\-:/()#,@\[\]+=&;{}!$*]*$")
RULE_DESCRIPTION_PATTERN = re.compile(r"^[a-zA-Z0-9 ._\-:/()#,@\[\]+=;{}!$*]*$")
EC2_DESCRIPTION_MAX_CHARS = 255
# Lambda's rule for SQS event sources: the queue's visibility timeout is at least six times the function's.
SQS_VISIBILITY_FACTOR = 6
# Actions with no resource type: IAM accepts only Resource "*" for them.
RESOURCELESS_ACTIONS = frozenset({"lambda:GetAccountSettings"})
# The DynamoDB Table methods the trainer may call, and the IAM action each needs.
DYNAMODB_ACTIONS = {
    "get_item": "dynamodb:GetItem",
    "put_item": "dynamodb:PutItem",
    "update_item": "dynamodb:UpdateItem",
    "delete_item": "dynamodb:DeleteItem",
    "query": "dynamodb:Query",
    "scan": "dynamodb:Scan",
    "batch_get_item": "dynamodb:BatchGetItem",
    "batch_write_item": "dynamodb:BatchWriteItem",
    "transact_get_items": "dynamodb:GetItem",
    "transact_write_items": "dynamodb:UpdateItem",  # the trainer's transactions hold Update items
    "describe_table": "dynamodb:DescribeTable",
}
# Variables `make image-test` overrides with `sam local invoke --env-vars`: SAM passes only declared ones.
# The endpoint variables are declared empty, so in the cloud boto3 uses AWS's endpoints.
EMPTY_IN_THE_CLOUD_ENV = ("AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_LAMBDA", "AWS_ENDPOINT_URL_S3")
LOCAL_OVERRIDE_ENV = ("EFS_ROOT", "STATUS_TABLE", *EMPTY_IN_THE_CLOUD_ENV)
# The first line `make lock` (tools/lock_requirements.py) writes into the image's requirements.txt.
LOCK_HEADER = "# Generated by `make lock`"
REQUIRED_OUTPUTS = (
    "BucketName",
    "StatusTableName",
    "TrainerFunctionName",
    "StagingFunctionName",
    "FileSystemId",
    "StartCommand",
)
# Every manylinux tag a glibc 2.34 system (Amazon Linux 2023, the python3.12/3.13 Lambda images) accepts:
# with --platform, pip matches only the tags it is given, and most wheels are tagged 2_17 or 2_28.
IMAGE_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(34, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)


class GateError(Exception):
    """A step could not run at all (missing tool, unreadable template); reported as one failure."""


# --- Loading -------------------------------------------------------------------------------------


def load_template(path: Path) -> dict[str, Any]:
    """The template as data (the one CloudFormation YAML reader of the project, in ``localrun.template``)."""
    try:
        template = cfn_template.load_template(path)
    except cfn_template.TemplateError as exc:
        raise GateError(str(exc)) from exc
    if not isinstance(template.get("Resources"), dict):
        raise GateError(f"{path} has no Resources mapping")
    return template


def translate(template: Mapping[str, Any]) -> dict[str, Any]:
    """Run the SAM translator offline, with placeholders for the artifacts `sam build` would produce."""
    import boto3  # imported here: slow, and only the translating steps need it
    from samtranslator.model.exceptions import InvalidDocumentException
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator

    sam_template = copy.deepcopy(dict(template))
    for resource in sam_template["Resources"].values():
        if not isinstance(resource, dict) or resource.get("Type") != "AWS::Serverless::Function":
            continue
        properties = resource.setdefault("Properties", {})
        if properties.get("PackageType") == "Image":
            properties.setdefault("ImageUri", PLACEHOLDER_IMAGE_URI)
        elif isinstance(properties.get("CodeUri"), str) and not properties["CodeUri"].startswith("s3://"):
            properties["CodeUri"] = PLACEHOLDER_CODE_URI
    global_function = sam_template.get("Globals", {}).get("Function", {})
    if isinstance(global_function.get("CodeUri"), str) and not global_function["CodeUri"].startswith("s3://"):
        global_function["CodeUri"] = PLACEHOLDER_CODE_URI

    translator = Translator(None, Parser(), boto_session=boto3.session.Session(region_name=REGION))
    try:
        return translator.translate(sam_template, parameter_values={}, get_managed_policy_map=lambda: {})
    except InvalidDocumentException as exc:
        causes = "; ".join(str(cause) for cause in exc.causes)
        raise GateError(f"SAM translation failed: {causes}") from exc


# --- The run's shared state ----------------------------------------------------------------------


@dataclass
class Gate:
    template_path: Path
    trainer_id: str
    table_id: str
    workdir: Path
    _template: dict[str, Any] | None = None
    _translated: dict[str, Any] | None = None
    _translated_path: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def template(self) -> dict[str, Any]:
        if self._template is None:
            self._template = load_template(self.template_path)
        return self._template

    @property
    def translated(self) -> dict[str, Any]:
        if self._translated is None:
            self._translated = translate(self.template)
        return self._translated

    @property
    def translated_path(self) -> Path:
        if self._translated_path is None:
            path = self.workdir / "translated.json"
            path.write_text(json.dumps(self.translated, indent=1, default=str))
            self._translated_path = path
        return self._translated_path

    @property
    def project_dir(self) -> Path:
        return self.template_path.parent

    def trainer_image_paths(self) -> tuple[Path, Path]:
        """The Dockerfile and requirements.txt that `sam build` would use for the trainer image."""
        resource = self.template["Resources"].get(self.trainer_id)
        if not isinstance(resource, dict):
            raise GateError(f"template has no {self.trainer_id} resource")
        metadata = resource.get("Metadata") or {}
        context = metadata.get("DockerContext")
        dockerfile = metadata.get("Dockerfile", "Dockerfile")
        if not isinstance(context, str):
            raise GateError(
                f"{self.trainer_id}: Metadata.DockerContext is missing; sam build cannot build the image"
            )
        context_dir = (self.project_dir / context).resolve()
        return context_dir / dockerfile, context_dir / "requirements.txt"


def find_tool(name: str) -> str:
    """A console script from this virtualenv, else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise GateError(f"{name} not found; run `make install` (it is pinned in requirements/dev.lock)")
    return found


def run_tool(
    command: list[str], timeout_s: float = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": REGION, **(env or {})}
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=full_env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise GateError(f"{Path(command[0]).name} did not finish within {timeout_s:.0f} s") from exc


def _tail(text: str, lines: int = 5) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "(no output)"


# --- Steps ---------------------------------------------------------------------------------------


def step_sam(gate: Gate) -> Iterator[str]:
    # Plain `sam validate` runs the SAM translator; `--lint` runs cfn-lint's SAM schema instead (it rejects
    # properties the translator accepts, e.g. FileSystemConfigs in Globals). Users run both; so does the gate.
    for extra in ([], ["--lint"]):
        command = [
            find_tool("sam"),
            "validate",
            *extra,
            "--region",
            REGION,
            "--template",
            str(gate.template_path),
        ]
        result = run_tool(command)
        if result.returncode != 0:
            yield f"{' '.join(['sam validate', *extra])}: {_tail(result.stderr + result.stdout)}"


def step_cfnlint(gate: Gate) -> Iterator[str]:
    # The translated template (cycles, property ranges after SAM's expansion) and the template as written
    # (what a user's plain `cfn-lint template.yaml` reports).
    for label, path in (("translated", gate.translated_path), ("template", gate.template_path)):
        result = run_tool([find_tool("cfn-lint"), "--format", "json", "--", str(path)])
        if result.returncode == 0:
            continue
        try:
            matches = json.loads(result.stdout)
        except json.JSONDecodeError:
            yield f"cfn-lint ({label}) exited {result.returncode}: {_tail(result.stderr + result.stdout)}"
            continue
        for match in matches:
            location = ".".join(str(part) for part in match.get("Location", {}).get("Path", [])) or "template"
            rule = match.get("Rule", {}).get("Id", "?")
            suffix = "" if label == "translated" else " (template)"
            yield f"{rule} {location}{suffix}: {match.get('Message', '').strip()}"


def step_checkov(gate: Gate) -> Iterator[str]:
    command = [
        find_tool("checkov"),
        "--skip-download",
        "--framework",
        "cloudformation",
        "--quiet",
        "--compact",
        "--output",
        "json",
        "--file",
        str(gate.template_path),
        "--file",
        str(gate.translated_path),
    ]
    result = run_tool(command, env={"BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        yield f"checkov exited {result.returncode} without a report: {_tail(result.stderr + result.stdout)}"
        return
    reports = report if isinstance(report, list) else [report]
    for entry in reports:
        if not isinstance(entry, dict) or "results" not in entry:  # "no files found" prints a summary only
            continue
        if entry.get("summary", {}).get("parsing_errors"):
            yield f"checkov could not parse: {entry['results'].get('parsing_errors')}"
        for check in entry["results"].get("failed_checks", []):
            source = (
                "template"
                if Path(check.get("file_abs_path", "")) == gate.template_path.resolve()
                else "translated"
            )
            yield f"{check['check_id']} {check['resource']} ({source}): {check['check_name']}"


def step_hadolint(gate: Gate) -> Iterator[str]:
    dockerfile, _ = gate.trainer_image_paths()
    if not dockerfile.is_file():
        yield f"Dockerfile not found at {dockerfile}"
        return
    result = run_tool([find_tool("hadolint"), "--no-color", str(dockerfile)])
    if result.returncode != 0:
        for line in (result.stdout + result.stderr).strip().splitlines():
            yield line.strip()


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(requirements: Path) -> tuple[dict[str, str], list[str]]:
    """``name==version`` lines as {normalized name: version}, plus the lines that are not exact pins."""
    pins: dict[str, str] = {}
    loose: list[str] = []
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._\-]*)\s*==\s*([A-Za-z0-9.+!\-]+)", line)
        if match is None:
            loose.append(line)
        else:
            pins[_normalize(match.group(1))] = match.group(2)
    return pins, loose


def base_image_python(dockerfile: Path) -> tuple[str, str]:
    """(the FROM image, its Python version "3.12") — the pip step resolves for exactly that interpreter."""
    images = re.findall(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
    if not images:
        raise GateError(f"{dockerfile} has no FROM line")
    match = BASE_IMAGE_PATTERN.match(images[-1])
    if match is None:
        raise GateError(
            f"{dockerfile}: base image {images[-1]!r} is not public.ecr.aws/lambda/python:3.12 or :3.13 "
            "(older Lambda images have a glibc too old for tensorflow-cpu 2.21)"
        )
    return images[-1], f"{match.group(1)}.{match.group(2)}"


def step_pip(gate: Gate) -> Iterator[str]:
    dockerfile, requirements = gate.trainer_image_paths()
    if not requirements.is_file():
        yield f"requirements not found at {requirements}"
        return
    _, python_version = base_image_python(dockerfile)
    pins, loose = read_pins(requirements)
    for line in loose:
        yield f"{requirements.name}: {line!r} is not pinned with == (the image must be reproducible)"
    report_path = gate.workdir / "pip-report.json"
    platforms = [arg for platform in IMAGE_PLATFORMS for arg in ("--platform", platform)]
    abi = "cp" + python_version.replace(".", "")
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--only-binary=:all:", *platforms, "--python-version", python_version, "--implementation", "cp",
        "--abi", abi, "--target", str(gate.workdir / "target"), "--report", str(report_path),
        "--requirement", str(requirements),
    ]  # fmt: skip
    result = run_tool(command, env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        yield (
            f"the pinned requirements do not resolve for CPython {python_version} manylinux_2_34_x86_64 "
            f"(wheels only): {_tail(chr(10).join(errors) or result.stderr, 3)}"
        )
        return
    installed = json.loads(report_path.read_text()).get("install", [])
    unpinned = sorted(
        f"{item['metadata']['name']}=={item['metadata']['version']}"
        for item in installed
        if _normalize(item["metadata"]["name"]) not in pins
    )
    if unpinned:
        yield f"{requirements.name}: resolved but not pinned (the image must be reproducible): {', '.join(unpinned)}"


# --- Assertions ----------------------------------------------------------------------------------


def _resources(template: Mapping[str, Any], type_name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for logical_id, resource in template.get("Resources", {}).items():
        if isinstance(resource, dict) and resource.get("Type") == type_name:
            yield logical_id, resource


def _ref(value: Any) -> str | None:
    """The logical ID that a ``Ref`` or ``Fn::GetAtt`` names, else None."""
    if isinstance(value, dict):
        if "Ref" in value and isinstance(value["Ref"], str):
            return value["Ref"]
        attribute = value.get("Fn::GetAtt")
        if isinstance(attribute, list) and attribute and isinstance(attribute[0], str):
            return attribute[0]
    return None


def _candidates(value: Any, parameters: Mapping[str, Any], label: str) -> list[tuple[str, Any]]:
    """Every value a property can take: a literal, a parameter's Default and bounds, both arms of Fn::If."""
    if isinstance(value, dict) and "Fn::If" in value:
        _, when_true, when_false = value["Fn::If"]
        return [
            *_candidates(when_true, parameters, label),
            *_candidates(when_false, parameters, label),
        ]
    if isinstance(value, dict) and value == {"Ref": "AWS::NoValue"}:
        return []
    name = _ref(value)
    if isinstance(value, dict) and name in parameters:
        parameter = parameters[name]
        found = [(f"{label} (parameter {name} Default)", parameter.get("Default"))]
        for bound in ("MaxValue", "MinValue"):
            if bound in parameter:
                found.append((f"{label} (parameter {name} {bound})", parameter[bound]))
        found += [
            (f"{label} (parameter {name} AllowedValues)", item) for item in parameter.get("AllowedValues", [])
        ]
        if "MaxValue" not in parameter and "AllowedValues" not in parameter:
            found.append((f"{label} (parameter {name} has no MaxValue or AllowedValues)", None))
        return found
    return [(label, value)]


def _check_range(
    owner: str, label: str, value: Any, parameters: Mapping[str, Any], low: int, high: int, what: str
) -> Iterator[str]:
    for where, candidate in _candidates(value, parameters, label):
        try:
            number = int(candidate)
        except (TypeError, ValueError):
            yield f"{owner}: {where} is {candidate!r}; expected a number from {low} to {high} ({what})"
            continue
        if not low <= number <= high:
            yield f"{owner}: {where} is {number}; expected {low} to {high} ({what})"


def _lambda_functions(translated: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from _resources(translated, "AWS::Lambda::Function")


def assert_lambda_limits(gate: Gate) -> Iterator[str]:
    parameters = gate.translated.get("Parameters", {})
    for logical_id, resource in _lambda_functions(gate.translated):
        properties = resource.get("Properties", {})
        if "Timeout" in properties:
            yield from _check_range(
                logical_id,
                "Timeout",
                properties["Timeout"],
                parameters,
                1,
                LAMBDA_MAX_TIMEOUT_S,
                "the Lambda maximum is 900 s",
            )
        if "MemorySize" in properties:
            yield from _check_range(
                logical_id, "MemorySize", properties["MemorySize"], parameters,
                LAMBDA_MIN_MEMORY_MB, LAMBDA_MAX_MEMORY_MB, "Lambda allows 128 to 10240 MB",
            )  # fmt: skip
        size = properties.get("EphemeralStorage", {}).get("Size")
        if size is not None:
            yield from _check_range(
                logical_id,
                "EphemeralStorage.Size",
                size,
                parameters,
                512,
                LAMBDA_MAX_EPHEMERAL_MB,
                "Lambda allows 512 to 10240 MB",
            )


def assert_file_systems(gate: Gate) -> Iterator[str]:
    mount_targets = sorted(
        logical_id for logical_id, _ in _resources(gate.translated, "AWS::EFS::MountTarget")
    )
    for logical_id, resource in _lambda_functions(gate.translated):
        properties = resource.get("Properties", {})
        configs = properties.get("FileSystemConfigs") or []
        if not configs:
            continue
        if not properties.get("VpcConfig"):
            yield f"{logical_id}: mounts EFS but has no VpcConfig; Lambda reaches mount targets only from a VPC"
        for config in configs:
            path = config.get("LocalMountPath")
            if not isinstance(path, str) or not MOUNT_PATH_PATTERN.match(path):
                yield f"{logical_id}: LocalMountPath {path!r} must be /mnt/<name> (Lambda mounts file systems only under /mnt/)"
            efs_root = properties.get("Environment", {}).get("Variables", {}).get(trainer_config.ENV_EFS_ROOT)
            if efs_root is not None and efs_root != path:
                yield f"{logical_id}: {trainer_config.ENV_EFS_ROOT} is {efs_root!r} but the file system is mounted at {path!r}"
        depends_on = resource.get("DependsOn", [])
        depends_on = [depends_on] if isinstance(depends_on, str) else depends_on
        missing = [target for target in mount_targets if target not in depends_on]
        if missing:
            yield (
                f"{logical_id}: DependsOn lacks mount target(s) {missing}; without them the function can be "
                "created before its mount targets exist and fail to mount"
            )


def _rules(
    template: Mapping[str, Any],
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(security group logical ID, rule owner for messages, rule) for every ingress rule, inline or separate."""
    for logical_id, resource in _resources(template, "AWS::EC2::SecurityGroup"):
        for index, rule in enumerate(resource.get("Properties", {}).get("SecurityGroupIngress") or []):
            yield logical_id, f"{logical_id}.SecurityGroupIngress[{index}]", rule
    for logical_id, resource in _resources(template, "AWS::EC2::SecurityGroupIngress"):
        properties = resource.get("Properties", {})
        yield _ref(properties.get("GroupId")) or "?", logical_id, properties


def _covers_port(rule: Mapping[str, Any], port: int) -> bool:
    protocol = str(rule.get("IpProtocol", "")).lower()
    if protocol in ("-1", "all"):
        return True
    if protocol not in ("tcp", "6"):
        return False
    try:
        return int(rule.get("FromPort", -1)) <= port <= int(rule.get("ToPort", -1))
    except (TypeError, ValueError):
        return True  # a port we cannot read may well include NFS


def assert_nfs_ingress(gate: Gate) -> Iterator[str]:
    template = gate.translated
    function_groups = {
        _ref(group)
        for _, resource in _lambda_functions(template)
        if resource.get("Properties", {}).get("FileSystemConfigs")
        for group in resource["Properties"].get("VpcConfig", {}).get("SecurityGroupIds", [])
    }
    efs_groups = {
        _ref(group)
        for _, resource in _resources(template, "AWS::EFS::MountTarget")
        for group in resource.get("Properties", {}).get("SecurityGroups", [])
    }
    for group, owner, rule in _rules(template):
        source = _ref(rule.get("SourceSecurityGroupId"))
        opens_cidr = any(key in rule for key in ("CidrIp", "CidrIpv6", "SourcePrefixListId"))
        if _covers_port(rule, NFS_PORT) and (opens_cidr or source not in function_groups):
            origin = rule.get("CidrIp") or rule.get("CidrIpv6") or rule.get("SourcePrefixListId") or source
            yield f"{owner}: NFS (port {NFS_PORT}) is open to {origin!r}; admit it only from the functions' security group"
        elif group in efs_groups and not _covers_port(rule, NFS_PORT):
            yield f"{owner}: the EFS security group {group} admits {rule.get('IpProtocol')} {rule.get('FromPort')}-{rule.get('ToPort')}; it needs NFS only"
    for group in sorted(g for g in efs_groups if g is not None):
        if group not in {g for g, _, _ in _rules(template)}:
            yield f"{group}: no ingress rule admits NFS from the functions, so they cannot mount EFS"


def assert_event_invoke_configs(gate: Gate) -> Iterator[str]:
    template = gate.translated
    parameters = template.get("Parameters", {})
    for logical_id, resource in _resources(template, "AWS::Lambda::EventInvokeConfig"):
        retries = resource.get("Properties", {}).get("MaximumRetryAttempts")
        if retries is not None:
            yield from _check_range(
                logical_id, "MaximumRetryAttempts", retries, parameters, 0, MAX_RETRY_ATTEMPTS,
                "the trainer re-dispatches failures itself",
            )  # fmt: skip


def _failure_destination_returns(template: Mapping[str, Any], trainer_id: str, destination: Any) -> bool:
    """Whether a failure record sent to ``destination`` is delivered back to the trainer."""
    target = _ref(destination)
    if target == trainer_id:
        return True
    if isinstance(destination, dict) and "Fn::Sub" in destination:
        function_name = template["Resources"][trainer_id].get("Properties", {}).get("FunctionName", {})
        sub = destination["Fn::Sub"]
        return (
            isinstance(function_name, dict)
            and isinstance(sub, str)
            and sub.endswith(":function:" + str(function_name.get("Fn::Sub")))
        )
    resource_type = template.get("Resources", {}).get(target, {}).get("Type") if target else None
    if resource_type == "AWS::SQS::Queue":
        return any(
            _ref(mapping.get("Properties", {}).get("EventSourceArn")) == target
            and _ref(mapping.get("Properties", {}).get("FunctionName")) == trainer_id
            and mapping.get("Properties", {}).get("Enabled", True) is not False
            for _, mapping in _resources(template, "AWS::Lambda::EventSourceMapping")
        )
    if resource_type == "AWS::SNS::Topic":
        return any(
            _ref(subscription.get("Properties", {}).get("TopicArn")) == target
            and _ref(subscription.get("Properties", {}).get("Endpoint")) == trainer_id
            for _, subscription in _resources(template, "AWS::SNS::Subscription")
        )
    return False


def assert_trainer(gate: Gate) -> Iterator[str]:
    template = gate.translated
    trainer = template.get("Resources", {}).get(gate.trainer_id)
    if not isinstance(trainer, dict) or trainer.get("Type") != "AWS::Lambda::Function":
        yield f"{gate.trainer_id}: no such function in the template"
        return
    properties = trainer.get("Properties", {})
    variables = properties.get("Environment", {}).get("Variables", {})
    for name in trainer_config.REQUIRED_ENV:
        if variables.get(name) in (None, ""):
            yield f"{gate.trainer_id}: environment variable {name} is not set; trainer.config reads it"
    if variables.get(trainer_config.ENV_ONEDNN) not in (None, "1"):
        yield f"{gate.trainer_id}: {trainer_config.ENV_ONEDNN} is {variables[trainer_config.ENV_ONEDNN]!r}; expected '1'"
    if properties.get("PackageType") != "Image":
        yield f"{gate.trainer_id}: PackageType is {properties.get('PackageType')!r}; expected Image (TensorFlow exceeds zip limits)"
    if not properties.get("FunctionName"):
        yield f"{gate.trainer_id}: FunctionName is not set; the handler invokes itself by a name known before deployment"
    if properties.get("RecursiveLoop") != "Allow":
        yield f"{gate.trainer_id}: RecursiveLoop is {properties.get('RecursiveLoop')!r}; expected Allow (training is an intentional chain)"

    configs = [
        resource.get("Properties", {})
        for _, resource in _resources(template, "AWS::Lambda::EventInvokeConfig")
        if _ref(resource.get("Properties", {}).get("FunctionName")) == gate.trainer_id
    ]
    if not configs:
        yield f"{gate.trainer_id}: no EventInvokeConfig; failed asynchronous invocations would be retried twice and lost"
    for config in configs:
        if config.get("MaximumRetryAttempts") is None:
            yield f"{gate.trainer_id}: EventInvokeConfig has no MaximumRetryAttempts (Lambda's default is 2 retries); set 0"
        destination = config.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination")
        if destination is None:
            yield f"{gate.trainer_id}: EventInvokeConfig has no OnFailure destination; failed workers would be lost"
        elif not _failure_destination_returns(template, gate.trainer_id, destination):
            yield (
                f"{gate.trainer_id}: OnFailure destination {json.dumps(destination)} does not lead back to the trainer "
                "(expected the trainer itself, or an SQS queue or SNS topic that invokes it)"
            )

    rules = [
        {
            rule["Name"].lower(): rule["Value"]
            for rule in configuration.get("Filter", {}).get("S3Key", {}).get("Rules", [])
        }
        for _, bucket in _resources(template, "AWS::S3::Bucket")
        for configuration in bucket.get("Properties", {})
        .get("NotificationConfiguration", {})
        .get("LambdaConfigurations", [])
        if _ref(configuration.get("Function")) == gate.trainer_id
    ]
    expected = {"prefix": trainer_protocol.START_PREFIX, "suffix": trainer_protocol.START_SUFFIX}
    if expected not in rules:
        yield f"{gate.trainer_id}: no S3 notification for {expected}; trainer.protocol accepts only those start objects (found {rules})"


def assert_watchdog(gate: Gate) -> Iterator[str]:
    """The watchdog's bound comes from FUNCTION_TIMEOUT_S, which must be the trainer's real timeout; the schedule
    must send the event trainer.protocol parses; the active-runs index it queries must exist."""
    template = gate.translated
    trainer = template.get("Resources", {}).get(gate.trainer_id, {}).get("Properties", {})
    variables = trainer.get("Environment", {}).get("Variables", {})
    declared = variables.get(trainer_config.ENV_FUNCTION_TIMEOUT_S)
    if declared is None or str(declared) != str(trainer.get("Timeout")):
        yield (
            f"{gate.trainer_id}: {trainer_config.ENV_FUNCTION_TIMEOUT_S} is {declared!r} but Timeout is "
            f"{trainer.get('Timeout')!r}; the watchdog would call live runs stalled (or wait too long)"
        )
    inputs = [
        target.get("Input")
        for _, rule in _resources(template, "AWS::Events::Rule")
        for target in rule.get("Properties", {}).get("Targets", [])
        if _ref(target.get("Arn")) == gate.trainer_id or gate.trainer_id in json.dumps(target.get("Arn"))
    ]
    if not any(_parses_as_watchdog(text) for text in inputs):
        yield f"{gate.trainer_id}: no schedule sends the watchdog event (found inputs {inputs})"
    table = template.get("Resources", {}).get(gate.table_id, {}).get("Properties", {})
    indexes = {
        index.get("IndexName"): [key.get("AttributeName") for key in index.get("KeySchema", [])]
        for index in table.get("GlobalSecondaryIndexes", [])
    }
    if indexes.get(trainer_coordination.ACTIVE_INDEX) != ["active"]:
        yield f"{gate.table_id}: no index {trainer_coordination.ACTIVE_INDEX!r} keyed on 'active' (found {indexes})"


def assert_alarm_topics(gate: Gate) -> Iterator[str]:
    """CloudWatch alarms cannot publish to an SNS topic encrypted with the AWS managed key: the alarm would fire
    and nobody would hear (the key's policy does not admit cloudwatch.amazonaws.com and cannot be edited)."""
    resources = gate.translated.get("Resources", {})
    for alarm_id, alarm in _resources(gate.translated, "AWS::CloudWatch::Alarm"):
        for action in alarm.get("Properties", {}).get("AlarmActions", []):
            topic = resources.get(_ref(action) or "", {})
            key = (
                topic.get("Properties", {}).get("KmsMasterKeyId")
                if topic.get("Type") == "AWS::SNS::Topic"
                else None
            )
            if isinstance(key, str) and key.lower() == "alias/aws/sns":
                yield (
                    f"{alarm_id}: notifies {_ref(action)}, encrypted with alias/aws/sns; CloudWatch cannot publish "
                    "to it (use a customer managed key whose policy admits cloudwatch.amazonaws.com, or none)"
                )


def _parses_as_watchdog(text: Any) -> bool:
    try:
        return isinstance(trainer_protocol.parse_event(json.loads(text)), trainer_protocol.WatchdogEvent)
    except (TypeError, ValueError):
        return False


def assert_status_table(gate: Gate) -> Iterator[str]:
    table = gate.translated.get("Resources", {}).get(gate.table_id)
    if not isinstance(table, dict) or table.get("Type") != "AWS::DynamoDB::Table":
        yield f"{gate.table_id}: no such AWS::DynamoDB::Table in the template"
        return
    properties = table.get("Properties", {})
    schema = tuple((key.get("AttributeName"), key.get("KeyType")) for key in properties.get("KeySchema", []))
    if schema != trainer_config.TABLE_KEY_SCHEMA:
        yield f"{gate.table_id}: KeySchema is {schema}; trainer.config.TABLE_KEY_SCHEMA is {trainer_config.TABLE_KEY_SCHEMA}"
    types = {
        item.get("AttributeName"): item.get("AttributeType")
        for item in properties.get("AttributeDefinitions", [])
    }
    for name, _ in trainer_config.TABLE_KEY_SCHEMA:
        if types.get(name) != "S":
            yield f"{gate.table_id}: key attribute {name!r} has type {types.get(name)!r}; expected 'S'"
    if properties.get("BillingMode") != "PAY_PER_REQUEST":
        yield f"{gate.table_id}: BillingMode is {properties.get('BillingMode')!r}; expected PAY_PER_REQUEST (runs are bursty)"
    runs_index = [  # `lambdatrain runs` lists runs from it (trainer.coordination.StatusTable.list_runs)
        index
        for index in properties.get("GlobalSecondaryIndexes", [])
        if index.get("IndexName") == trainer_coordination.RUNS_INDEX
    ]
    keys = [
        (key.get("AttributeName"), key.get("KeyType"))
        for index in runs_index
        for key in index.get("KeySchema", [])
    ]
    if keys != [("kind", "HASH"), ("created_at", "RANGE")] or runs_index[0].get("Projection") != {
        "ProjectionType": "ALL"
    }:
        yield (
            f"{gate.table_id}: no index {trainer_coordination.RUNS_INDEX!r} keyed on kind (HASH) and created_at "
            f"(RANGE) projecting ALL (found {runs_index}); `lambdatrain runs` reads whole run items from it"
        )


def assert_retained(gate: Gate) -> Iterator[str]:
    for type_name in ("AWS::EFS::FileSystem", "AWS::DynamoDB::Table"):
        for logical_id, resource in _resources(gate.template, type_name):
            for policy in ("DeletionPolicy", "UpdateReplacePolicy"):
                if resource.get(policy) != "Retain":
                    yield f"{logical_id}: {policy} is {resource.get(policy)!r}; expected Retain (it holds data a deletion would lose)"


def _policy_documents(template: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for logical_id, resource in _resources(template, "AWS::IAM::Role"):
        for policy in resource.get("Properties", {}).get("Policies", []):
            yield f"{logical_id}/{policy.get('PolicyName')}", policy.get("PolicyDocument", {})
    for type_name in ("AWS::IAM::Policy", "AWS::IAM::RolePolicy", "AWS::IAM::ManagedPolicy"):
        for logical_id, resource in _resources(template, type_name):
            yield logical_id, resource.get("Properties", {}).get("PolicyDocument", {})


def assert_least_privilege(gate: Gate) -> Iterator[str]:
    for owner, document in _policy_documents(gate.translated):
        statements = document.get("Statement", [])
        for index, statement in enumerate([statements] if isinstance(statements, dict) else statements):
            if statement.get("Effect") != "Allow":
                continue
            where = f"{owner} statement {statement.get('Sid', index)}"
            if "NotAction" in statement or "NotResource" in statement:
                yield f"{where}: NotAction/NotResource grants everything else; list the actions and resources"
            actions = statement.get("Action", [])
            for action in [actions] if isinstance(actions, str) else actions:
                if isinstance(action, str) and (action == "*" or action.endswith(":*")):
                    yield f"{where}: wildcard action {action!r}; grant the actions the function uses"
            resources = statement.get("Resource", [])
            action_list = [actions] if isinstance(actions, str) else actions
            if "*" in ([resources] if isinstance(resources, str) else resources) and not (
                action_list and set(action_list) <= RESOURCELESS_ACTIONS
            ):
                yield f"{where}: Resource '*'; name the resources the function uses"
    for logical_id, resource in _resources(gate.translated, "AWS::IAM::Role"):
        for arn in resource.get("Properties", {}).get("ManagedPolicyArns", []):
            name = arn.rsplit("/", 1)[-1] if isinstance(arn, str) else json.dumps(arn)
            if name not in ALLOWED_MANAGED_POLICIES:
                yield f"{logical_id}: managed policy {name} is not one of {sorted(ALLOWED_MANAGED_POLICIES)}; scope it inline"


def assert_parameters_and_outputs(gate: Gate) -> Iterator[str]:
    for name, parameter in gate.template.get("Parameters", {}).items():
        missing = [
            key for key in ("Type", "Description", "Default", "ConstraintDescription") if key not in parameter
        ]
        if missing:
            yield f"Parameters.{name}: missing {missing}"
        if not any(key in parameter for key in ("MinValue", "MaxValue", "AllowedValues", "AllowedPattern")):
            yield f"Parameters.{name}: no MinValue/MaxValue, AllowedValues or AllowedPattern constraint"
    outputs = gate.template.get("Outputs", {})
    for name in REQUIRED_OUTPUTS:
        if name not in outputs:
            yield f"Outputs.{name}: missing (the CLIs and the README read it)"
    for name, output in outputs.items():
        if not output.get("Description"):
            yield f"Outputs.{name}: no Description"


def assert_checkov_skips_explained(gate: Gate) -> Iterator[str]:
    for logical_id, resource in gate.template.get("Resources", {}).items():
        skips = ((resource.get("Metadata") or {}).get("checkov") or {}).get("skip", [])
        for skip in skips:
            if not isinstance(skip, dict) or not str(skip.get("comment", "")).strip():
                yield f"{logical_id}: checkov skip {skip!r} has no comment giving the reason"


def assert_image(gate: Gate) -> Iterator[str]:
    dockerfile, requirements = gate.trainer_image_paths()
    if not dockerfile.is_file():
        yield f"{gate.trainer_id}: Dockerfile {dockerfile} does not exist"
        return
    if not requirements.is_file():
        yield f"{gate.trainer_id}: {requirements} does not exist"
    elif not requirements.with_suffix(".in").is_file():
        yield f"{requirements.name}: no {requirements.with_suffix('.in').name} next to it; `make lock` generates it from one"
    elif not requirements.read_text().startswith(LOCK_HEADER):
        yield f"{requirements.name}: not generated by `make lock` (edit {requirements.with_suffix('.in').name}, then run make lock)"
    text = dockerfile.read_text()
    try:
        base_image_python(dockerfile)
    except GateError as exc:
        yield str(exc)
    commands = re.findall(r"^\s*CMD\s+(.+)$", text, flags=re.MULTILINE)
    try:
        command = json.loads(commands[-1]) if commands else None
    except json.JSONDecodeError:
        command = commands[-1]
    if command != ["app.lambda_handler"]:
        yield f'{dockerfile.name}: CMD is {command!r}; expected ["app.lambda_handler"] (src/handler/app.py)'
    if not re.search(r"\bTF_ENABLE_ONEDNN_OPTS=1\b", text):
        yield f"{dockerfile.name}: does not set ENV TF_ENABLE_ONEDNN_OPTS=1"
    if not re.search(r"pip install[^\n]*-r\s+\S*requirements\.txt", text):
        yield f"{dockerfile.name}: does not pip install -r requirements.txt"
    for source in ("app.py", "trainer/"):
        if not re.search(rf"^\s*COPY\s+[^\n]*\b{re.escape(source)}", text, flags=re.MULTILINE):
            yield f"{dockerfile.name}: does not COPY {source} into the image"
    for logical_id, resource in _resources(gate.template, "AWS::Serverless::Function"):
        code_uri = resource.get("Properties", {}).get("CodeUri")
        if (
            isinstance(code_uri, str)
            and not code_uri.startswith("s3://")
            and not (gate.project_dir / code_uri).is_dir()
        ):
            yield f"{logical_id}: CodeUri {code_uri!r} is not a directory next to the template"


def _description_failures(
    owner: str, key: str, value: Any, pattern: re.Pattern[str], allowed: str
) -> Iterator[str]:
    if value is None:
        return
    if not isinstance(value, str):
        yield f"{owner}: {key} is {json.dumps(value)}; write it as a literal string so it can be checked"
        return
    bad = sorted({character for character in value if not pattern.match(character)})
    if bad:
        yield f"{owner}: {key} {value!r} contains {bad}; EC2 allows only a-z A-Z 0-9 spaces and {allowed} (InvalidParameterValue)"
    if len(value) > EC2_DESCRIPTION_MAX_CHARS:
        yield f"{owner}: {key} is {len(value)} characters; EC2 allows {EC2_DESCRIPTION_MAX_CHARS}"


def assert_security_group_descriptions(gate: Gate) -> Iterator[str]:
    group_allowed, rule_allowed = "._-:/()#,@[]+=&;{}!$*", "._-:/()#,@[]+=;{}!$*"
    for logical_id, resource in _resources(gate.translated, "AWS::EC2::SecurityGroup"):
        properties = resource.get("Properties", {})
        yield from _description_failures(
            logical_id,
            "GroupDescription",
            properties.get("GroupDescription"),
            GROUP_DESCRIPTION_PATTERN,
            group_allowed,
        )
        for direction in ("SecurityGroupIngress", "SecurityGroupEgress"):
            for index, rule in enumerate(properties.get(direction) or []):
                yield from _description_failures(
                    f"{logical_id}.{direction}[{index}]", "Description", rule.get("Description"),
                    RULE_DESCRIPTION_PATTERN, rule_allowed,
                )  # fmt: skip
    for type_name in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress"):
        for logical_id, resource in _resources(gate.translated, type_name):
            yield from _description_failures(
                logical_id, "Description", resource.get("Properties", {}).get("Description"),
                RULE_DESCRIPTION_PATTERN, rule_allowed,
            )  # fmt: skip


def _role_statements(template: Mapping[str, Any], role_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, statement) for every Allow statement attached to the role, inline or as a separate policy."""
    documents = [
        (f"{role_id}/{policy.get('PolicyName')}", policy.get("PolicyDocument", {}))
        for policy in template["Resources"].get(role_id, {}).get("Properties", {}).get("Policies", [])
    ]
    for type_name in ("AWS::IAM::Policy", "AWS::IAM::RolePolicy"):
        for logical_id, resource in _resources(template, type_name):
            properties = resource.get("Properties", {})
            roles = [properties.get("RoleName"), *(properties.get("Roles") or [])]
            if any(_ref(role) == role_id for role in roles):
                documents.append((logical_id, properties.get("PolicyDocument", {})))
    for owner, document in documents:
        statements = document.get("Statement", [])
        for statement in [statements] if isinstance(statements, dict) else statements:
            if statement.get("Effect") == "Allow":
                yield owner, statement


def _actions(statement: Mapping[str, Any]) -> list[str]:
    actions = statement.get("Action", [])
    return [actions] if isinstance(actions, str) else list(actions)


def dynamodb_actions_called(source_dir: Path) -> set[str]:
    """The IAM actions for every DynamoDB Table method named in the trainer's code (called, or passed by name)."""
    text = "\n".join(path.read_text() for path in sorted(source_dir.glob("*.py")))
    return {
        action
        for method, action in DYNAMODB_ACTIONS.items()
        if re.search(rf"\.{method}\(|[\"']{method}[\"']", text)
    }


def assert_trainer_permissions(gate: Gate) -> Iterator[str]:
    template = gate.translated
    trainer = template["Resources"].get(gate.trainer_id, {})
    role_id = _ref(trainer.get("Properties", {}).get("Role"))
    if role_id is None:
        yield f"{gate.trainer_id}: no role from this template; cannot check its permissions"
        return
    statements = list(_role_statements(template, role_id))
    granted = {action for _, statement in statements for action in _actions(statement)}
    source_dir = gate.project_dir / "src" / "handler" / "trainer"
    if source_dir.is_dir():
        needed = dynamodb_actions_called(source_dir)
        dynamodb_granted = {action for action in granted if action.startswith("dynamodb:")}
        if dynamodb_granted != needed:
            yield (
                f"{role_id}: grants DynamoDB actions {sorted(dynamodb_granted)}; the trainer calls exactly "
                f"{sorted(needed)} (grant those, not a CRUD policy)"
            )
    for action in ("lambda:GetAccountSettings", "lambda:GetFunctionConcurrency"):
        if action not in granted:
            yield f"{role_id}: lacks {action}; trainer.quotas reads the concurrency limits at start"
    for owner, statement in statements:
        actions = _actions(statement)
        if "s3:PutObject" in actions and "s3:AbortMultipartUpload" not in actions:
            yield (
                f"{owner} statement {statement.get('Sid', '?')}: grants s3:PutObject without s3:AbortMultipartUpload; "
                "upload_file uploads large files in parts and must be able to abort them"
            )


def _number(value: Any, parameters: Mapping[str, Any]) -> int | None:
    name = _ref(value)
    if isinstance(value, dict) and name in parameters:
        value = parameters[name].get("Default")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def assert_queue_visibility(gate: Gate) -> Iterator[str]:
    template = gate.translated
    parameters = template.get("Parameters", {})
    for logical_id, mapping in _resources(template, "AWS::Lambda::EventSourceMapping"):
        properties = mapping.get("Properties", {})
        queue_id, function_id = _ref(properties.get("EventSourceArn")), _ref(properties.get("FunctionName"))
        queue = template["Resources"].get(queue_id or "", {})
        function = template["Resources"].get(function_id or "", {})
        if queue.get("Type") != "AWS::SQS::Queue" or function.get("Type") != "AWS::Lambda::Function":
            continue
        timeout_s = _number(function.get("Properties", {}).get("Timeout", 3), parameters)
        visibility_s = _number(queue.get("Properties", {}).get("VisibilityTimeout", 30), parameters)
        if (
            timeout_s is not None
            and visibility_s is not None
            and visibility_s < SQS_VISIBILITY_FACTOR * timeout_s
        ):
            yield (
                f"{queue_id}: VisibilityTimeout is {visibility_s} s; {logical_id} feeds it to {function_id} "
                f"(timeout {timeout_s} s) and AWS requires at least {SQS_VISIBILITY_FACTOR} x {timeout_s} = "
                f"{SQS_VISIBILITY_FACTOR * timeout_s} s"
            )


def assert_logging(gate: Gate) -> Iterator[str]:
    for logical_id, resource in _lambda_functions(gate.translated):
        properties = resource.get("Properties", {})
        if properties.get("PackageType") == "Image":
            continue  # the trainer writes its own JSON lines (trainer.logs)
        log_format = properties.get("LoggingConfig", {}).get("LogFormat")
        if log_format != "JSON":
            yield (
                f"{logical_id}: LoggingConfig.LogFormat is {log_format!r}; expected JSON (in Text, the runtime "
                "drops the fields passed with extra= and CloudWatch gets the message only)"
            )


def assert_local_overrides_declared(gate: Gate) -> Iterator[str]:
    trainer = gate.translated["Resources"].get(gate.trainer_id, {})
    variables = trainer.get("Properties", {}).get("Environment", {}).get("Variables", {})
    for name in LOCAL_OVERRIDE_ENV:
        if name not in variables:
            yield (
                f"{gate.trainer_id}: environment variable {name} is not declared; `sam local invoke --env-vars` "
                "(make image-test) can override only declared variables"
            )
    for name in EMPTY_IN_THE_CLOUD_ENV:
        if variables.get(name, "") != "":
            yield f"{gate.trainer_id}: {name} is {variables[name]!r}; expected '' (deployed functions use AWS's endpoints)"


def assert_model_export(gate: Gate) -> Iterator[str]:
    """Every cloud run exports final.keras to the stack's bucket: the trainer's MODEL_BUCKET names the bucket (by
    the same BucketName expression: a Ref would close the cycle bucket notification -> function -> bucket), and
    its role may put objects under models/."""
    template = gate.translated
    resources = template.get("Resources", {})
    trainer = resources.get(gate.trainer_id, {})
    variables = trainer.get("Properties", {}).get("Environment", {}).get("Variables", {})
    value = variables.get(trainer_config.ENV_MODEL_BUCKET)
    buckets = {
        logical_id: bucket.get("Properties", {}).get("BucketName")
        for logical_id, bucket in _resources(template, "AWS::S3::Bucket")
    }
    notified = [
        logical_id
        for logical_id, bucket in _resources(template, "AWS::S3::Bucket")
        for configuration in bucket.get("Properties", {})
        .get("NotificationConfiguration", {})
        .get("LambdaConfigurations", [])
        if _ref(configuration.get("Function")) == gate.trainer_id
    ]
    if value in (None, ""):
        yield (
            f"{gate.trainer_id}: environment variable {trainer_config.ENV_MODEL_BUCKET} is not set; runs not "
            "started by an S3 object would not export final.keras to the bucket"
        )
        return
    matches = [logical_id for logical_id, name in buckets.items() if name is not None and name == value]
    if not matches:
        yield (
            f"{gate.trainer_id}: {trainer_config.ENV_MODEL_BUCKET} is {json.dumps(value)}, which is no bucket's "
            f"BucketName in the template (the start objects' bucket is {notified or 'none'})"
        )
        return
    if notified and matches[0] not in notified:
        yield f"{gate.trainer_id}: {trainer_config.ENV_MODEL_BUCKET} names {matches[0]}, not the bucket of its start objects {notified}"
    role_id = _ref(trainer.get("Properties", {}).get("Role"))
    wanted = {"Fn::Sub": f"${{{matches[0]}.Arn}}/{trainer_config.MODEL_PREFIX}*"}
    granted = [
        statement
        for _, statement in _role_statements(template, role_id or "")
        if "s3:PutObject" in _actions(statement)
        and wanted
        in (
            [statement.get("Resource")]
            if isinstance(statement.get("Resource"), dict)
            else statement.get("Resource") or []
        )
    ]
    if not granted:
        yield f"{role_id}: does not grant s3:PutObject on {json.dumps(wanted)}; the combine uploads final.keras there"


def _dashboard_metrics(body: Any) -> tuple[set[tuple[str, str, str, str]], str | None]:
    """(namespace, metric, dimension, value) of every metric line in a dashboard body, or why it cannot be read."""
    text = body.get("Fn::Sub") if isinstance(body, dict) else body
    if not isinstance(text, str):
        return set(), f"DashboardBody is {json.dumps(body)[:80]}; expected a JSON text (Fn::Sub)"
    try:
        document = json.loads(text)
    except ValueError as exc:
        return set(), f"DashboardBody is not JSON: {exc}"
    found: set[tuple[str, str, str, str]] = set()
    for widget in document.get("widgets", []):
        for line in widget.get("properties", {}).get("metrics", []):
            names = [item for item in line if isinstance(item, str)]
            if len(names) >= 4:
                found.add((names[0], names[1], names[2], names[3]))
    return found, None


def assert_dashboard(gate: Gate) -> Iterator[str]:
    """The optional dashboard: present only when EnableDashboard is "true", and plotting every metric the combine
    emits (trainer.embedded_metrics) under its namespace and per-stack dimension, the trainer's name."""
    template = gate.translated
    parameter = template.get("Parameters", {}).get("EnableDashboard")
    if not isinstance(parameter, dict):
        yield "template: no EnableDashboard parameter; the dashboard must be optional"
        return
    if parameter.get("Default") != "false" or sorted(parameter.get("AllowedValues", [])) != ["false", "true"]:
        yield 'EnableDashboard: expected AllowedValues ["true", "false"] and Default "false"'
    conditions = {
        name
        for name, condition in template.get("Conditions", {}).items()
        if condition == {"Fn::Equals": [{"Ref": "EnableDashboard"}, "true"]}
    }
    dashboards = list(_resources(template, "AWS::CloudWatch::Dashboard"))
    if not dashboards:
        yield "template: no AWS::CloudWatch::Dashboard; EnableDashboard would add nothing"
    for logical_id, dashboard in dashboards:
        if dashboard.get("Condition") not in conditions:
            yield (
                f"{logical_id}: Condition is {dashboard.get('Condition')!r}; expected one that is "
                'EnableDashboard = "true" (the dashboard is optional)'
            )
        found, problem = _dashboard_metrics(dashboard.get("Properties", {}).get("DashboardBody"))
        if problem:
            yield f"{logical_id}: {problem}"
            continue
        dimension_value = f"${{{gate.trainer_id}}}"
        missing = [
            name
            for name in trainer_metrics.METRICS
            if (trainer_metrics.NAMESPACE, name, trainer_metrics.DIMENSION, dimension_value) not in found
        ]
        if missing:
            yield (
                f"{logical_id}: does not plot {missing} in namespace {trainer_metrics.NAMESPACE!r} with "
                f"{trainer_metrics.DIMENSION} = {dimension_value}; the combine emits them (trainer/embedded_metrics.py)"
            )


ASSERTIONS: tuple[Callable[[Gate], Iterator[str]], ...] = (
    assert_lambda_limits,
    assert_file_systems,
    assert_nfs_ingress,
    assert_security_group_descriptions,
    assert_event_invoke_configs,
    assert_queue_visibility,
    assert_trainer,
    assert_trainer_permissions,
    assert_model_export,
    assert_dashboard,
    assert_watchdog,
    assert_alarm_topics,
    assert_local_overrides_declared,
    assert_logging,
    assert_status_table,
    assert_retained,
    assert_least_privilege,
    assert_parameters_and_outputs,
    assert_checkov_skips_explained,
    assert_image,
)


def step_asserts(gate: Gate) -> Iterator[str]:
    for assertion in ASSERTIONS:
        yield from assertion(gate)


STEP_FUNCTIONS: dict[str, Callable[[Gate], Iterator[str]]] = {
    "sam": step_sam,
    "cfnlint": step_cfnlint,
    "checkov": step_checkov,
    "hadolint": step_hadolint,
    "pip": step_pip,
    "asserts": step_asserts,
}


# --- CLI -----------------------------------------------------------------------------------------


def _step_list(text: str) -> list[str]:
    steps = [step.strip() for step in text.split(",") if step.strip()]
    unknown = [step for step in steps if step not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    return steps


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="template_gate",
        description="Lint and check template.yaml and the trainer image without AWS or Docker.",
        epilog=f"steps: {', '.join(STEPS)}",
    )
    parser.add_argument(
        "--template",
        type=Path,
        default=REPO_ROOT / "template.yaml",
        help="SAM template (default: %(default)s)",
    )
    parser.add_argument(
        "--only", type=_step_list, default=None, metavar="STEP[,STEP]", help="run only these steps"
    )
    parser.add_argument(
        "--skip", type=_step_list, action="append", default=[], metavar="STEP[,STEP]", help="skip these steps"
    )
    parser.add_argument(
        "--trainer",
        default="TrainerFunction",
        help="logical ID of the trainer function (default: %(default)s)",
    )
    parser.add_argument(
        "--table", default="StatusTable", help="logical ID of the status table (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    skipped = {step for group in args.skip for step in group}
    selected = [step for step in STEPS if (args.only is None or step in args.only) and step not in skipped]
    started = time.monotonic()
    failed_steps: list[str] = []
    with tempfile.TemporaryDirectory(prefix="template-gate-") as workdir:
        gate = Gate(
            template_path=args.template.resolve(),
            trainer_id=args.trainer,
            table_id=args.table,
            workdir=Path(workdir),
        )
        for step in selected:
            step_started = time.monotonic()
            try:
                failures = list(STEP_FUNCTIONS[step](gate))
            except GateError as exc:
                failures = [str(exc)]
            for failure in failures:
                print(f"FAIL {step}: {failure}", flush=True)
            if failures:
                failed_steps.append(step)
            else:
                print(f"ok   {step} ({time.monotonic() - step_started:.1f} s)", flush=True)
    elapsed = time.monotonic() - started
    if failed_steps:
        print(f"error: template gate failed in {', '.join(failed_steps)} ({elapsed:.1f} s)", file=sys.stderr)
        return 1
    print(f"template gate passed: {', '.join(selected)} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
