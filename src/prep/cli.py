"""``cifar10-prep``: CIFAR-10 -> NumPy arrays in a local folder, and optionally S3 -> EFS.

Examples (``make preprocess`` runs the same command)::

    cifar10-prep --source ../shared/cifar10/cifar-10-python.tar.xz --out .local/efs/datasets/cifar10
    cifar10-prep                      # downloads the official archive into .local/cache/ first
    cifar10-prep --source cifar-10-python.tar.gz --s3-uri s3://my-bucket/datasets/cifar10 \\
        --stack lambdatrain --region us-east-1

Errors print one line, ``error: ...``, on stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from prep import cifar, download, manifest, stage, upload
from prep.errors import PrepError
from trainer import logs


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar10-prep",
        description="Convert CIFAR-10 (python version) into NumPy arrays plus manifest.json, "
        "and optionally stage them into EFS through S3.",
    )
    source = parser.add_argument_group("input and output")
    source.add_argument(
        "--source",
        type=Path,
        help="a .tar.gz or .tar.xz of CIFAR-10, or an extracted cifar-10-batches-py/ folder (or its parent); "
        "without it the official archive is downloaded",
    )
    source.add_argument(
        "--out", type=Path, default=cifar.DEFAULT_OUT_DIR, help="output folder (default: %(default)s)"
    )
    source.add_argument(
        "--force", action="store_true", help="rebuild even if OUT was made from the same source"
    )
    fetch = parser.add_argument_group("download (without --source)")
    fetch.add_argument(
        "--url",
        help=f"where to download the archive (default: ${download.URL_ENV} or {download.CIFAR10_URL})",
    )
    fetch.add_argument(
        "--cache-dir",
        type=Path,
        default=cifar.DEFAULT_CACHE_DIR,
        help="where downloads are kept and resumed (default: %(default)s)",
    )
    cloud = parser.add_argument_group("cloud (S3 upload, then the staging function copies into EFS)")
    cloud.add_argument("--s3-uri", help="upload the arrays and manifest to s3://bucket/prefix")
    cloud.add_argument("--stack", help="deployed stack whose StagingFunctionName output to invoke")
    cloud.add_argument("--region", help="AWS region (default: the configured one)")
    cloud.add_argument(
        "--dataset",
        default=manifest.DATASET_NAME,
        help="folder name under <EFS>/datasets/ (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 error, 2 usage error)."""
    parser = main_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logs.JsonFormatter())
        logging.getLogger("prep").addHandler(handler)
        logging.getLogger("prep").setLevel(logging.INFO)
    try:
        _run(args)
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the previous dataset is unchanged", file=sys.stderr)
        return 130
    return 0


def _run(args: argparse.Namespace) -> None:
    location = _check_cloud_arguments(args)
    result = cifar.prepare_dataset(
        args.source, args.out, force=args.force, cache_dir=args.cache_dir, url=args.url
    )
    counts = result.manifest["class_counts"]
    if result.rebuilt:
        print(
            f"prepared {sum(counts['train'])} train + {sum(counts['test'])} test images "
            f"from {result.manifest['source']['name']} in {result.out_dir} ({result.duration_s:.1f} s)"
        )
    else:
        print(f"up to date: {result.out_dir} was made from the same source (--force rebuilds)")
    if location is None:
        return
    clients = upload.AwsClients.for_region(args.region)
    sent, staged = upload.publish(
        result.out_dir,
        result.manifest,
        location,
        stack_name=args.stack,
        dataset=args.dataset,
        clients=clients,
    )
    print(
        f"uploaded {len(sent.uploaded)} file(s), {sent.size_bytes / 1e6:.1f} MB, to {location.uri()}"
        + (f" ({len(sent.skipped)} unchanged)" if sent.skipped else "")
    )
    print(
        f"staged {len(staged.get('files', []))} file(s), {staged.get('bytes', 0) / 1e6:.1f} MB, "
        f"into {staged.get('directory')} in {staged.get('seconds', 0):.1f} s"
    )


def _check_cloud_arguments(args: argparse.Namespace) -> upload.S3Location | None:
    """Validate the cloud options before any work is done."""
    if args.s3_uri is None:
        extra = [flag for flag, value in (("--stack", args.stack), ("--region", args.region)) if value]
        if extra:
            raise PrepError(f"{' and '.join(extra)}: only used with --s3-uri")
        return None
    if not args.stack:
        raise PrepError("--s3-uri needs --stack (the deployed stack with the staging function)")
    if not stage.NAME_PATTERN.fullmatch(args.dataset):
        raise PrepError(f"--dataset must match [A-Za-z0-9_-]{{1,64}}, got {args.dataset!r}")
    return upload.S3Location.parse(args.s3_uri)


def entrypoint() -> None:
    """Console script ``cifar10-prep``."""
    sys.exit(main())
