"""`make install` checks every prerequisite first, and names the install command for each one missing.

The script runs with a PATH of stand-in commands (python, java, npm, uname) that report chosen versions.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "check_prerequisites.sh"


def fake_path(tmp_path: Path, python: str | None, java: str | None, npm: bool, platform: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    system, machine = platform.split()
    commands = {"uname": f'[ "$1" = -s ] && echo {system} || echo {machine}'}
    if python is not None:
        commands["python3"] = (
            f'case "$*" in *ensurepip*) exit 0 ;; *) echo {python} ;; esac'
            if python != "no-venv"
            else 'case "$*" in *ensurepip*) exit 1 ;; *) echo 3.12 ;; esac'
        )
    if java is not None:
        commands["java"] = f"echo 'openjdk version \"{java}\" 2024-01-16' >&2"
    if npm:
        commands["npm"] = "echo 10.2.4"
    for name, body in commands.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    for tool in ("awk", "sh", "cat"):
        (bin_dir / tool).symlink_to(
            subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        )
    return str(bin_dir)


CASES = [
    pytest.param(("3.12", "17.0.9", True, "Linux x86_64"), None, id="all-present"),
    pytest.param(("3.13", "21.0.1", True, "Linux x86_64"), None, id="newest-python-and-java"),
    pytest.param(
        ("3.10", "17.0.9", True, "Linux x86_64"), "python3 is Python 3.10; 3.11 to 3.13", id="python-too-old"
    ),
    pytest.param(
        ("3.14", "17.0.9", True, "Linux x86_64"), "python3 is Python 3.14; 3.11 to 3.13", id="python-too-new"
    ),
    pytest.param(
        ("no-venv", "17.0.9", True, "Linux x86_64"),
        "install: sudo apt-get install python3.12-venv",
        id="no-venv",
    ),
    pytest.param((None, "17.0.9", True, "Linux x86_64"), "python3 not found", id="no-python"),
    pytest.param(
        ("3.12", "11.0.22", True, "Linux x86_64"),
        "java is version 11.0.22; DynamoDB Local needs 17",
        id="java-11",
    ),
    pytest.param(("3.12", "1.8.0_392", True, "Linux x86_64"), "java is version 1.8.0_392", id="java-8"),
    pytest.param(("3.12", None, True, "Linux x86_64"), "java not found", id="no-java"),
    pytest.param(("3.12", "17.0.9", False, "Linux x86_64"), "npm not found", id="no-npm"),
    pytest.param(
        ("3.12", "17.0.9", True, "Darwin arm64"), "platform Darwin arm64 is not supported", id="macos-arm"
    ),
    pytest.param(
        ("3.12", "17.0.9", True, "Linux aarch64"), "platform Linux aarch64 is not supported", id="linux-arm"
    ),
]


@pytest.mark.parametrize(("setup", "expected"), CASES)
def test_prerequisite_check(tmp_path, setup, expected):
    python, java, npm, platform = setup
    env = {"PATH": fake_path(tmp_path, python, java, npm, platform), "PYTHON": "python3"}

    result = subprocess.run(["/bin/sh", str(SCRIPT)], capture_output=True, text=True, env=env, check=False)

    if expected is None:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("prerequisites: ")
    else:
        assert result.returncode == 1
        assert expected in result.stderr
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        install_lines = [line for line in result.stderr.splitlines() if line.strip().startswith("install: ")]
        assert len(error_lines) == len(install_lines) >= 1
