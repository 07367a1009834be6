"""prep on hostile archives: small files that claim or expand to huge batches fail fast, in little memory.

Each archive is run through the real command (``python -m prep``) in a child process whose peak resident
memory is measured, so a fix that only moves the allocation elsewhere still fails the test.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from prep import cifar

REPO_ROOT = Path(__file__).resolve().parents[2]
FOLDER = "cifar-10-batches-py"
MAX_PEAK_RSS_BYTES = 200 * 1024 * 1024  # the command itself (Python, NumPy, tqdm) takes about 75 MB
GZIP_BOMB_BYTES = 250 * 1024 * 1024  # zeros: about 255 KB once gzipped
SHAPE_BOMB_IMAGES = 40_000  # per batch: 123 MB of images conjured from a shape, and as much again converted


class _ArrayFromShape:
    """Pickles as ``numpy.ndarray(shape, "u1")``: an array of any size from a few bytes of pickle."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (np.ndarray, (self.shape, "u1"))


def gzip_bomb(path: Path) -> Path:
    """A .tar.gz of about 255 KB whose data_batch_1 is 250 MiB of zeros.

    Written as gzip members one after the other (which every gzip reader joins), so that it takes no time to
    build: the tar header, 250 copies of one compressed MiB of zeros, then the tar's two end blocks.
    """
    header = tarfile.TarInfo(f"{FOLDER}/data_batch_1")
    header.size = GZIP_BOMB_BYTES  # a multiple of 512, so no padding follows the data
    one_mib = gzip.compress(bytes(1024 * 1024), compresslevel=9, mtime=0)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT), mtime=0))
        for _ in range(GZIP_BOMB_BYTES // (1024 * 1024)):
            handle.write(one_mib)
        handle.write(gzip.compress(bytes(2 * tarfile.BLOCKSIZE), mtime=0))
    return path


def shape_bomb_batch(images: int) -> bytes:
    """A batch whose labels look right and whose data is ``numpy.ndarray((images, 3072))`` called directly."""
    return pickle.dumps({b"data": _ArrayFromShape((images, 3072)), b"labels": [0] * images}, protocol=2)


def shape_bomb(path: Path) -> Path:
    """A small .tar.gz of six such batches (and no pixel data at all)."""
    payload = shape_bomb_batch(SHAPE_BOMB_IMAGES)
    with tarfile.open(path, "w:gz") as tar:
        for name in cifar.BATCH_NAMES:
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


_MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps({"returncode": done.returncode, "stderr": done.stderr, "peak_rss_bytes": peak}))
"""


def run_prep_measured(source: Path, out_dir: Path) -> dict[str, object]:
    """Run ``python -m prep --source SOURCE --out OUT_DIR`` in a fresh process; its exit status, stderr and
    peak resident memory (measured by a parent that runs nothing else)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT / "src/handler")]),
    }
    command = [sys.executable, "-m", "prep", "--source", str(source), "--out", str(out_dir)]
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert measured.returncode == 0, measured.stderr
    return json.loads(measured.stdout)


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (gzip_bomb, r"data_batch_1: 262144000 bytes, more than the 67108864 \(64 MiB\) a CIFAR-10 batch"),
        (shape_bomb, r"data_batch_1: not a readable CIFAR-10 pickle .*refusing to call numpy\.ndarray"),
    ],
    ids=["gzip-of-250mib-member", "ndarray-called-with-a-huge-shape"],
)
def test_small_hostile_archive_fails_in_one_line_without_taking_the_memory(tmp_path, build, pattern):
    source = build(tmp_path / "hostile.tar.gz")
    assert source.stat().st_size < 300 * 1024
    out_dir = tmp_path / "out"

    started = time.monotonic()
    result = run_prep_measured(source, out_dir)

    assert time.monotonic() - started < 60
    assert result["returncode"] == 1
    lines = str(result["stderr"]).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert re.search(pattern, lines[0]), lines[0]
    assert result["peak_rss_bytes"] < MAX_PEAK_RSS_BYTES, f"peak RSS {result['peak_rss_bytes']} bytes"
    assert not out_dir.exists()
