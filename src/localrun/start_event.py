"""The start event of ``lambdatrain local``: one option per :class:`trainer.config.TrainConfig` field, the demo
preset, ``--config KEY=VALUE`` pairs, and the trainer's own validation before anything starts."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from localrun.errors import LocalRuntimeError
from trainer import config, errors, protocol

# `--demo`: a fixed amount of work (3 epochs of the first 40,000 training images, 4 workers, width 0.25, the trainer's
# default algorithm and batch), sized to finish within 8 minutes on the slowest 2-core host measured (~190 img/s
# per worker at batch 64, two at a time); bench/RESULTS.md "Demo" has the arithmetic. Explicit options and --config
# override these.
DEMO_PRESET: dict[str, Any] = {
    "workers": 4,
    "model": "vgg19_bn",
    "width": 0.25,
    "epochs": 3,
    "train_samples": 40_000,
    "test_samples": 2_000,
}
RESERVED_KEYS = ("start", "run", "resume")  # set by --run and --resume, never by --config

TRAINING_FIELDS = dataclasses.fields(config.TrainConfig)
# How an option parses its value, and its metavar, by the field's annotation (TrainConfig's are strings).
_OPTION_KINDS: dict[str, dict[str, Any]] = {
    "int": {"type": int, "metavar": "N"},
    "float": {"type": float, "metavar": "X"},
    "str": {"type": str},
    "str | None": {"type": str},
    "bool": {"action": argparse.BooleanOptionalAction},
}


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--batch-size`` ...: one option per training field (unset: the trainer's default), and
    ``--config`` for any start-event key."""
    group = parser.add_argument_group(
        "training configuration (the start event; unset keys take the trainer's defaults)"
    )
    for field in TRAINING_FIELDS:
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            help=field.metadata.get("help"),
            **_OPTION_KINDS[str(field.type)],
        )
    group.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other start-event key, value as JSON where it parses (repeatable): --config outer_momentum=0.9",
    )


def build_start_event(args: argparse.Namespace, run_id: str) -> dict[str, Any]:
    """The start event: the demo preset, then --config pairs, then the named options; validated by the trainer."""
    options = {field.name: getattr(args, field.name) for field in TRAINING_FIELDS}
    options = {name: value for name, value in options.items() if value is not None}
    if args.resume:
        if args.run and args.run != args.resume:
            raise LocalRuntimeError(
                f"--run {args.run} and --resume {args.resume} name different runs; give one"
            )
        if options or args.config or args.demo:
            raise LocalRuntimeError(
                "--resume continues a run with its own configuration; drop the training options"
            )
        event: dict[str, Any] = {"start": True, "run": run_id, "resume": True}
    else:
        training: dict[str, Any] = dict(DEMO_PRESET) if args.demo else {}
        training.update(parse_pairs(args.config, "--config", as_json=True))
        training.update(options)
        reserved = sorted(set(RESERVED_KEYS) & set(training))
        if reserved:
            raise LocalRuntimeError(f"--config cannot set {reserved}; use --run or --resume")
        training.setdefault("workers", DEMO_PRESET["workers"])
        event = {"start": True, "run": run_id, **training}
    try:  # the trainer's own validation, before anything starts
        protocol.parse_start(event)
    except errors.InvalidEventError as exc:
        raise LocalRuntimeError(f"invalid training configuration: {exc}") from exc
    return event


def parse_pairs(pairs: Sequence[str], option: str, as_json: bool) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; with ``as_json`` values are JSON where they parse (``0.9``, ``true``)."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise LocalRuntimeError(f"{option} expects KEY=VALUE, got {pair!r}")
        if as_json:
            try:
                parsed[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                parsed[key.strip()] = value
        else:
            parsed[key.strip()] = value
    return parsed
