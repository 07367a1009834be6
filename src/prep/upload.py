"""Cloud path: upload a prepared dataset to S3, then have the staging function copy it into EFS.

``make preprocess S3_URI=s3://bucket/prefix STACK=<name>``:

1. upload ``train_x.npy`` … ``test_y.npy`` with boto3's managed transfer (multipart above 16 MiB, parallel
   parts), each with its sha256 in the object metadata; an object whose metadata and size already match is
   skipped, so a rerun uploads nothing new. ``manifest.json`` goes last, so a reader that finds the
   manifest finds the arrays it lists;
2. read the staging function's name from the stack output ``StagingFunctionName``;
3. invoke it synchronously (``RequestResponse``) with ``{"stage": {"bucket", "prefix", "dataset"}}``
   and return its summary; a function error becomes a :class:`PrepError`.

Clients are passed in (see :class:`AwsClients`) so tests can hand in moto or stubbed ones.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import tqdm
from boto3.s3 import transfer as s3_transfer

from prep import manifest, stage
from prep.errors import PrepError

logger = logging.getLogger(__name__)

STAGING_FUNCTION_OUTPUT = "StagingFunctionName"
SHA256_METADATA_KEY = "sha256"  # x-amz-meta-sha256 on each uploaded object
MIB = 1024 * 1024
TRANSFER_CONFIG = s3_transfer.TransferConfig(
    multipart_threshold=16 * MIB, multipart_chunksize=16 * MIB, max_concurrency=8
)
# The staging function may run up to Lambda's 15-minute limit; a synchronous invoke must wait that long
# and must not be retried by the SDK (a retry would stage twice, concurrently).
INVOKE_CONFIG = botocore.config.Config(
    read_timeout=905, connect_timeout=10, retries={"total_max_attempts": 1}
)
_S3_URI = re.compile(r"s3://(?P<bucket>[^/]+)/?(?P<prefix>.*)")


STAGING_PREFIX = "datasets/"


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing "/"

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """``s3://bucket/prefix`` -> S3Location; the same rules as the staging function's event."""
        match = _S3_URI.fullmatch(uri)
        if not match or not stage.BUCKET_PATTERN.fullmatch(match["bucket"]):
            raise PrepError(
                f"--s3-uri must look like s3://bucket/prefix with a valid bucket name, got {uri!r}"
            )
        try:
            prefix = stage.check_prefix(match["prefix"])
        except stage.StagingError as exc:
            raise PrepError(f"--s3-uri {uri!r}: {exc}") from exc
        if not prefix.startswith(STAGING_PREFIX):
            # The staging function may read only datasets/* (template.yaml); fail before uploading 180 MB.
            raise PrepError(
                f"--s3-uri {uri!r}: the prefix must start with {STAGING_PREFIX!r} "
                f"(e.g. s3://{match['bucket']}/{STAGING_PREFIX}cifar10), the only prefix the staging function reads"
            )
        return cls(bucket=match["bucket"], prefix=prefix)

    def key(self, file_name: str) -> str:
        return f"{self.prefix}/{file_name}" if self.prefix else file_name

    def uri(self, file_name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(file_name)}"


@dataclass(frozen=True)
class AwsClients:
    s3: Any
    cloudformation: Any
    lambda_: Any

    @classmethod
    def for_region(cls, region: str | None) -> AwsClients:
        """Clients from the default credential chain; ``region`` None means the configured default."""
        session = boto3.session.Session(region_name=region)
        return cls(
            s3=session.client("s3"),
            cloudformation=session.client("cloudformation"),
            lambda_=session.client("lambda", config=INVOKE_CONFIG),
        )


@dataclass(frozen=True)
class UploadSummary:
    uploaded: list[str]
    skipped: list[str]  # already in S3 with the same sha256 and size
    size_bytes: int  # bytes actually sent


def upload_dataset(
    out_dir: Path, dataset_manifest: Mapping[str, Any], location: S3Location, *, s3_client: Any
) -> UploadSummary:
    """Upload the four arrays, then the manifest, to ``location`` (see module doc)."""
    files = [
        (entry["file"], entry["sha256"])
        for entry in (dataset_manifest["arrays"][n] for n in manifest.ARRAY_NAMES)
    ]
    uploaded: list[str] = []
    skipped: list[str] = []
    sent = 0
    for file_name, sha256 in files:
        path = out_dir / file_name
        if _already_uploaded(s3_client, location, file_name, sha256, path.stat().st_size):
            skipped.append(file_name)
            continue
        sent += _upload_file(s3_client, location, path, sha256)
        uploaded.append(file_name)
    manifest_path = out_dir / manifest.MANIFEST_FILE
    sent += _upload_file(s3_client, location, manifest_path, None)
    uploaded.append(manifest.MANIFEST_FILE)
    logger.info("dataset_uploaded", extra={"uri": location.uri(), "size_bytes": sent})
    return UploadSummary(uploaded=uploaded, skipped=skipped, size_bytes=sent)


def _already_uploaded(
    s3_client: Any, location: S3Location, file_name: str, sha256: str, size_bytes: int
) -> bool:
    try:
        head = s3_client.head_object(Bucket=location.bucket, Key=location.key(file_name))
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise PrepError(f"{location.uri(file_name)}: {_describe(exc)}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise PrepError(f"{location.uri(file_name)}: {exc}") from exc
    return head.get("Metadata", {}).get(SHA256_METADATA_KEY) == sha256 and head["ContentLength"] == size_bytes


def _upload_file(s3_client: Any, location: S3Location, path: Path, sha256: str | None) -> int:
    size_bytes = path.stat().st_size
    extra_args: dict[str, Any] = {"ContentType": "application/octet-stream"}
    if sha256:
        extra_args["Metadata"] = {SHA256_METADATA_KEY: sha256}
    with tqdm.tqdm(
        total=size_bytes, unit="B", unit_scale=True, desc=f"uploading {path.name}", disable=None
    ) as bar:
        try:
            s3_client.upload_file(
                str(path), location.bucket, location.key(path.name),
                ExtraArgs=extra_args, Config=TRANSFER_CONFIG, Callback=bar.update,
            )  # fmt: skip
        except (boto3.exceptions.S3UploadFailedError, botocore.exceptions.BotoCoreError) as exc:
            raise PrepError(f"{path}: upload to {location.uri(path.name)} failed ({exc})") from exc
    return size_bytes


def find_staging_function(cloudformation_client: Any, stack_name: str) -> str:
    """The physical name of the staging function, from the stack's ``StagingFunctionName`` output."""
    try:
        stacks = cloudformation_client.describe_stacks(StackName=stack_name)["Stacks"]
    except botocore.exceptions.ClientError as exc:
        raise PrepError(f"stack {stack_name!r}: {_describe(exc)} (is it deployed in this region?)") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise PrepError(f"stack {stack_name!r}: {exc}") from exc
    outputs = (
        {output["OutputKey"]: output["OutputValue"] for output in stacks[0].get("Outputs", [])}
        if stacks
        else {}
    )
    if STAGING_FUNCTION_OUTPUT not in outputs:
        raise PrepError(
            f"stack {stack_name!r} has no output {STAGING_FUNCTION_OUTPUT} "
            f"(outputs: {sorted(outputs)}); deploy a template that declares the staging function"
        )
    return outputs[STAGING_FUNCTION_OUTPUT]


def invoke_staging(
    lambda_client: Any, function_name: str, location: S3Location, dataset: str
) -> dict[str, Any]:
    """Invoke the staging function synchronously and return its summary; its errors raise PrepError."""
    event = {"stage": {"bucket": location.bucket, "prefix": location.prefix, "dataset": dataset}}
    try:
        response = lambda_client.invoke(
            FunctionName=function_name, InvocationType="RequestResponse", Payload=json.dumps(event).encode()
        )
    except botocore.exceptions.ClientError as exc:
        raise PrepError(f"invoking {function_name}: {_describe(exc)}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise PrepError(f"invoking {function_name}: {exc}") from exc
    raw = response["Payload"].read()
    try:
        payload = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        payload = raw.decode(errors="replace")
    if response.get("FunctionError"):
        if isinstance(payload, dict):
            detail = f"{payload.get('errorType', 'Error')}: {payload.get('errorMessage', '')}"
        else:
            detail = str(payload)
        raise PrepError(f"staging function {function_name} failed ({response['FunctionError']}): {detail}")
    if not isinstance(payload, dict):
        raise PrepError(
            f"staging function {function_name} returned {payload!r:.200}, expected a summary object"
        )
    return payload


def publish(
    out_dir: Path,
    dataset_manifest: Mapping[str, Any],
    location: S3Location,
    *,
    stack_name: str,
    dataset: str,
    clients: AwsClients,
) -> tuple[UploadSummary, dict[str, Any]]:
    """Find the staging function (before uploading anything), upload, invoke it into
    ``<EFS>/datasets/<dataset>/``; returns the upload and staging summaries."""
    function_name = find_staging_function(clients.cloudformation, stack_name)
    upload_summary = upload_dataset(out_dir, dataset_manifest, location, s3_client=clients.s3)
    staging_summary = invoke_staging(clients.lambda_, function_name, location, dataset)
    return upload_summary, staging_summary


def _describe(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', 'error')}: {error.get('Message', exc)}"
