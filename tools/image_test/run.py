"""Run every sample event in events/ through the built trainer image with `sam local invoke`, and check each result.

Called by ``make image-test`` (tools/image_test/image_test.sh) after ``sam build TrainerFunction``, with
DOCKER_HOST pointing at a running engine. The containers run on Docker's default bridge (SAM CLI 1.170 does not
apply ``--docker-network host``; it only skips connecting another network), so they reach this machine at the
bridge's gateway address (172.17.0.1), where these stand-ins listen:

- DynamoDB Local (localrun.dynamodb_local), one table per phase, created from template.yaml's schema;
- the local Invoke API (localrun.lambda_api) serving a recorder under the name SAM gives the function
  (its logical ID), so the trainer's fan-out and re-dispatches are seen, not executed;
- a read-only S3 stand-in serving the start object that events/s3_put.json names.

The endpoints reach the function through ``--env-vars``, which overrides only variables the template declares
(template.yaml declares them empty; trainer.config and boto3 treat empty as unset).

SAM does not mount EFS (``FileSystemConfigs`` is ignored locally). The EFS a phase needs is baked into a fixture
image (``FROM`` the built trainer image, ``COPY`` to /mnt/efs), named as the function's ``ImageUri`` in a copy of
the built template (``--invoke-image`` does not help: SAM builds image functions' containers from ``ImageUri``).
What an invocation writes to /mnt/efs is gone when its container exits; DynamoDB Local keeps the state.

- phase "fresh": EFS holds the prepared dataset; the table is empty. start -> s3_put -> stop.
- phase "midrun": the run of events/start.json created on the host by the real handler and advanced to round 14
  (the round events/worker.json and combine.json name), with its round-14 weights on EFS.
  failure_record -> worker -> combine.

Each result is compared with what the README's Events section documents for that state (``sam local invoke``
exits 0 even when the handler raises, so the JSON it prints is what is checked).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO_ROOT / "src" / "handler"), str(REPO_ROOT / "src"), str(REPO_ROOT / "tools")]

from template_gate import LOCAL_OVERRIDE_ENV  # noqa: E402

from localrun import dynamodb_local, environment, function, lambda_api, settings  # noqa: E402

FUNCTION_ID = "TrainerFunction"  # sam local sets AWS_LAMBDA_FUNCTION_NAME to the logical ID
EVENTS_DIR = REPO_ROOT / "events"
TINY_CIFAR10 = REPO_ROOT / "tests" / "fixtures" / "cifar10-tiny.tar.gz"
RUN_ID = "vgg19-bn-6w"  # the run every sample event names
MIDRUN_ROUND = 14  # the round events/worker.json, combine.json and failure_record.json name
RECORDER_WAIT_S = 60.0


@dataclass(frozen=True)
class Expectation:
    event: str  # file in events/
    phase: str  # "fresh" or "midrun"
    result: Mapping[str, Any]  # keys the returned JSON must have, with these values
    invoked: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)  # events the trainer must send


EXPECTATIONS = (
    Expectation(
        "start.json",
        "fresh",
        {"status": "started", "run": RUN_ID, "workers": 6, "total_rounds": 120},  # 30 epochs x 4 rounds
        tuple({"workerno": index, "workers": 6, "round": 0, "run": RUN_ID} for index in range(6)),
    ),
    # The same start object again, read from S3: a redelivered notification is a no-op.
    Expectation("s3_put.json", "fresh", {"status": "duplicate", "run": RUN_ID, "state": "RUNNING"}),
    Expectation("stop.json", "fresh", {"status": "stop_requested", "run": RUN_ID}),
    # The scheduled watchdog: the fresh run has just started, so nothing is stalled.
    Expectation("watchdog.json", "fresh", {"status": "checked", "actions": {}}),
    # Worker 3 of round 14 failed once: sent again with attempt 2.
    Expectation(
        "failure_record.json",
        "midrun",
        {"status": "redispatched", "attempt": 2},
        ({"workerno": 3, "round": MIDRUN_ROUND, "run": RUN_ID, "attempt": 2},),
    ),
    # Trains worker 3's share of round 14 in the container (TensorFlow, the full-width VGG-19-BN).
    Expectation("worker.json", "midrun", {"status": "trained", "done": 1}),
    # The combine waits until every worker wrote: only worker 3 has registered.
    Expectation("combine.json", "midrun", {"status": "ignored", "reason": "1 of 6 workers registered"}),
    # A reducer of a sharded round (this run has one combine per round) waits for the workers just the same.
    Expectation("reduce.json", "midrun", {"status": "ignored", "reason": "1 of 6 workers registered"}),
)


class ImageTestError(Exception):
    """A fixture could not be prepared, or an event returned something other than documented."""


# --- Fixtures ------------------------------------------------------------------------------------


class _S3Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        body = self.server.objects.get(key)  # type: ignore[attr-defined]
        if body is None:
            body, status, kind = b"<Error><Code>NoSuchKey</Code></Error>", 404, "application/xml"
        else:
            status, kind = 200, "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def s3_stand_in(objects: Mapping[str, bytes], host: str) -> Iterator[str]:
    """GetObject for ``/bucket/key`` paths (boto3 uses path style for an IP endpoint) on ``host``."""
    server = http.server.ThreadingHTTPServer((host, 0), _S3Handler)
    server.objects = dict(objects)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def recorder_api(workdir: Path, host: str) -> Iterator[tuple[function.LocalFunction, str]]:
    """The local Invoke API on ``host`` with one function named like the trainer, whose handler only acknowledges."""
    with lambda_api.LambdaApiServer([], host=host) as api:
        config = settings.FunctionSettings(
            name=FUNCTION_ID,
            handler="recorder.handle",
            code_dir=HERE,
            timeout_s=30.0,
            environment=environment.handler_environment(
                function_name=FUNCTION_ID,
                efs_root=workdir,
                status_table="unused",
                lambda_endpoint_url=api.endpoint_url,
                dynamodb_endpoint_url="http://127.0.0.1:9",
                memory_mb=settings.DEFAULT_MEMORY_MB,
            ),
            unset_environment=environment.UNSET_FOR_HANDLER,
            concurrency=2,
        )
        with function.LocalFunction(config) as recorder:
            api.add_function(recorder)
            yield recorder, api.endpoint_url


def prepare_dataset(efs_root: Path) -> None:
    from prep import cli as prep_cli

    out = efs_root / "datasets" / "cifar10"
    status = prep_cli.main(["--source", str(TINY_CIFAR10), "--out", str(out)])
    if status != 0:
        raise ImageTestError(f"cifar10-prep of {TINY_CIFAR10} into {out} exited {status}")


def seed_midrun(efs_root: Path, handler_env: Mapping[str, str]) -> None:
    """Create the run of events/start.json with the real handler on the host, then advance it to round 14."""
    os.environ.update(handler_env)
    import app  # the Lambda entry point, as the image runs it
    from trainer import coordination, efs_layout

    result = app.lambda_handler(json.loads((EVENTS_DIR / "start.json").read_text()), None)
    if result.get("status") != "started":
        raise ImageTestError(f"seeding the mid-run fixture: start returned {result}")
    status = coordination.StatusTable.from_name(handler_env["STATUS_TABLE"])
    for round_index in range(MIDRUN_ROUND):  # commits as a combine makes them, without the training
        run = status.get_run(RUN_ID)
        epochs_done = run.schedule.epochs_done_after(round_index)
        metrics = coordination.RoundMetrics(
            epochs_done=epochs_done, samples=0, train_loss=0.0, duration_s={}, bytes_read=0, bytes_written=0
        )
        token = f"seed{round_index + 1}"
        status.commit_round(run, epochs_done, coordination.RUNNING, token, coordination.RunSummary(), metrics)
    run = status.get_run(RUN_ID)
    layout = efs_layout.EfsLayout(efs_root)
    target = layout.weights_path(RUN_ID, MIDRUN_ROUND, run.weights_token)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(layout.weights_path(RUN_ID, 0, coordination.INITIAL_TOKEN), target)


def build_fixture_image(base_image: str, efs_root: Path, tag: str) -> None:
    """The trainer image plus ``efs_root`` at /mnt/efs (SAM does not mount EFS)."""
    with tempfile.TemporaryDirectory(prefix="image-test-context-") as context:
        shutil.copytree(efs_root, Path(context) / "efs", symlinks=False)
        (Path(context) / "Dockerfile").write_text(f"FROM {base_image}\nCOPY efs/ /mnt/efs/\n")
        result = subprocess.run(
            ["docker", "build", "-q", "-t", tag, context], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise ImageTestError(f"docker build of {tag} failed: {result.stderr.strip()[-500:]}")


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge: what a container reaches this machine at."""
    result = subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    gateway = result.stdout.strip()
    if result.returncode == 0 and gateway:
        return gateway
    # A fresh data root's bridge has no Gateway in its IPAM config: take docker0's own address.
    link = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True, check=False
    )
    fields = link.stdout.split()
    if link.returncode == 0 and "inet" in fields:
        return fields[fields.index("inet") + 1].split("/")[0]
    raise ImageTestError(
        f"cannot find the default bridge's gateway (docker network inspect: {result.stderr.strip() or 'no Gateway'}; "
        f"ip addr show docker0: {link.stderr.strip() or 'no inet address'})"
    )


def built_image(build_dir: Path) -> str:
    from localrun import template as cfn_template

    built = cfn_template.load_template(build_dir / "template.yaml")
    image = built["Resources"][FUNCTION_ID]["Properties"].get("ImageUri")
    if not isinstance(image, str):
        raise ImageTestError(
            f"{build_dir / 'template.yaml'} has no ImageUri for {FUNCTION_ID}; run sam build first"
        )
    return image


def fixture_template(build_dir: Path, image: str, fixture_image: str, phase: str) -> Path:
    """A copy of the built template, next to it, whose trainer runs ``fixture_image``."""
    text = (build_dir / "template.yaml").read_text()
    old = f"ImageUri: {image}\n"
    if text.count(old) != 1:
        raise ImageTestError(f"expected one {old.strip()!r} in {build_dir / 'template.yaml'}")
    path = build_dir / f"template-image-test-{phase}.yaml"
    path.write_text(text.replace(old, f"ImageUri: {fixture_image}\n"))
    return path


# --- Invoking ------------------------------------------------------------------------------------


def invoke(
    sam: str, template: Path, event: Path, env_file: Path, aws_env: Mapping[str, str]
) -> tuple[dict[str, Any], float, str]:
    command = [
        sam, "local", "invoke", FUNCTION_ID, "--template", str(template), "--event", str(event),
        "--env-vars", str(env_file), "--skip-pull-image",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, check=False, env={**os.environ, **aws_env}
    )
    duration_s = time.monotonic() - started
    for line in reversed(result.stdout.strip().splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                return parsed, duration_s, result.stderr
    raise ImageTestError(
        f"sam local invoke -e {event.name} exited {result.returncode} without a JSON result: "
        f"{(result.stderr + result.stdout).strip()[-800:]}"
    )


def _matches(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    return all(actual.get(key) == value for key, value in expected.items())


def wait_for_invocations(recorder: function.LocalFunction, seen: int, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + RECORDER_WAIT_S
    while len(recorder.history) - seen < count and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5 if count == 0 else 0)  # an unexpected extra invocation has a moment to show up
    return [completed.event for completed in list(recorder.history)[seen:]]


def check(expectation: Expectation, result: Mapping[str, Any], invoked: list[dict[str, Any]]) -> list[str]:
    problems = []
    if "errorType" in result:
        problems.append(f"the handler raised {result['errorType']}: {result.get('errorMessage')}")
    elif not _matches(result, expectation.result):
        problems.append(f"returned {json.dumps(result)}; documented {json.dumps(dict(expectation.result))}")
    unmatched = [
        wanted for wanted in expectation.invoked if not any(_matches(got, wanted) for got in invoked)
    ]
    if unmatched or len(invoked) != len(expectation.invoked):
        problems.append(
            f"invoked {len(invoked)} event(s) {json.dumps(invoked)}; expected {len(expectation.invoked)} "
            f"matching {json.dumps([dict(wanted) for wanted in expectation.invoked])}"
        )
    return problems


# --- Main ----------------------------------------------------------------------------------------


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image_test", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--build-dir", type=Path, default=REPO_ROOT / ".aws-sam" / "build")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".local" / "image-test")
    parser.add_argument("--sam", default=str(Path(sys.executable).parent / "sam"))
    parser.add_argument(
        "--only",
        type=Path,
        default=None,
        metavar="EVENT",
        help="invoke only this event (and the events before it in its phase, which set up its state)",
    )
    return parser


def selected(only: Path | None) -> tuple[Expectation, ...]:
    if only is None:
        return EXPECTATIONS
    names = [expectation.event for expectation in EXPECTATIONS]
    if only.name not in names:
        raise ImageTestError(f"--only {only}: expected one of events/{{{','.join(names)}}}")
    chosen = EXPECTATIONS[names.index(only.name)]
    phase = [expectation for expectation in EXPECTATIONS if expectation.phase == chosen.phase]
    return tuple(phase[: phase.index(chosen) + 1])


def main(argv: list[str] | None = None) -> int:
    try:
        return run(main_parser().parse_args(argv))
    except ImageTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        expectations = selected(args.only)
    except ImageTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = sorted({path.name for path in EVENTS_DIR.glob("*.json")} - {e.event for e in EXPECTATIONS})
    if missing:
        print(
            f"error: no documented result for {missing}; add them to EXPECTATIONS in {__file__}",
            file=sys.stderr,
        )
        return 1
    base_image = built_image(args.build_dir)
    shutil.rmtree(args.workdir, ignore_errors=True)
    phases = sorted({expectation.phase for expectation in expectations})
    efs = {phase: args.workdir / phase / "efs" for phase in phases}
    aws_env = {
        "AWS_ACCESS_KEY_ID": environment.ACCESS_KEY_ID,  # DynamoDB Local runs -sharedDb; any key works
        "AWS_SECRET_ACCESS_KEY": environment.SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": environment.REGION,
        "SAM_CLI_TELEMETRY": "0",
    }
    s3_record = json.loads((EVENTS_DIR / "s3_put.json").read_text())["Records"][0]["s3"]
    start_object = f"/{s3_record['bucket']['name']}/{s3_record['object']['key']}"
    failures = 0
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(dynamodb_local.DynamoDBLocal())
        gateway = bridge_gateway()
        recorder, lambda_url = stack.enter_context(recorder_api(args.workdir, gateway))
        start_body = (EVENTS_DIR / "start.json").read_bytes()
        s3_url = stack.enter_context(s3_stand_in({start_object: start_body}, gateway))
        dynamodb_url = f"http://{gateway}:{database.port}"  # DynamoDB Local listens on every address
        import boto3

        client = boto3.client("dynamodb", **environment.client_settings(database.endpoint_url))
        for phase, root in efs.items():
            dynamodb_local.create_table(client, f"image-test-{phase}", REPO_ROOT / "template.yaml")
            prepare_dataset(root)
        phase_started = time.monotonic()
        handler_env = {
            "EFS_ROOT": str(args.workdir / "midrun" / "efs"),
            "STATUS_TABLE": "image-test-midrun",
            "AWS_ENDPOINT_URL_DYNAMODB": database.endpoint_url,
            "AWS_ENDPOINT_URL_LAMBDA": lambda_url,
            "AWS_ENDPOINT_URL_S3": s3_url,
            "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_ID,
            **aws_env,
        }
        if "midrun" in efs:
            seed_midrun(efs["midrun"], handler_env)
            print(
                f"fixture: run {RUN_ID} at round {MIDRUN_ROUND} on the host ({time.monotonic() - phase_started:.1f} s)"
            )
        templates = {}
        for phase, root in efs.items():
            phase_started = time.monotonic()
            fixture_image = f"lambdatrain-image-test-{phase}:efs"  # one repository each: SAM names its
            build_fixture_image(base_image, root, fixture_image)  # emulator image <repository>:rapid-x86_64
            templates[phase] = fixture_template(args.build_dir, base_image, fixture_image, phase)
            print(f"fixture: image {fixture_image} ({time.monotonic() - phase_started:.1f} s)")
        for expectation in expectations:
            overrides = {
                "EFS_ROOT": "/mnt/efs",
                "STATUS_TABLE": f"image-test-{expectation.phase}",
                "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_url,
                "AWS_ENDPOINT_URL_LAMBDA": lambda_url,
                "AWS_ENDPOINT_URL_S3": s3_url,
            }
            if set(overrides) != set(LOCAL_OVERRIDE_ENV):
                raise ImageTestError(
                    f"overrides {sorted(overrides)} differ from the gate's {LOCAL_OVERRIDE_ENV}"
                )
            env_file = args.workdir / f"env-{expectation.phase}.json"
            env_file.write_text(json.dumps({FUNCTION_ID: overrides}, indent=1))
            seen = len(recorder.history)
            result, duration_s, stderr = invoke(
                args.sam, templates[expectation.phase], EVENTS_DIR / expectation.event, env_file, aws_env
            )
            invoked = wait_for_invocations(recorder, seen, len(expectation.invoked))
            problems = check(expectation, result, invoked)
            (args.workdir / f"{expectation.event}.log").write_text(stderr)
            label = f"{expectation.event:<20} {expectation.phase:<6}"
            if problems:
                failures += 1
                for problem in problems:
                    print(f"FAIL {label} {problem}")
                print(f"     log: {args.workdir / (expectation.event + '.log')}")
            else:
                extra = f", {len(invoked)} invoked" if invoked else ""
                print(f"ok   {label} {json.dumps(result)}{extra} ({duration_s:.1f} s)")
    elapsed = time.monotonic() - started
    if failures:
        print(
            f"error: {failures} of {len(expectations)} events did not return their documented result ({elapsed:.0f} s)"
        )
        return 1
    print(f"image test passed: {len(expectations)} events through sam local invoke ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
