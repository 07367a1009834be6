"""Benchmark ``prep.cifar.prepare`` on the full CIFAR-10 archive: wall time and peak memory.

Target (issue 2): the full ``cifar-10-python.tar.xz`` (150 MB) preprocesses in at most 60 s with a peak
resident set of at most 1.5 GB on the 2-core development machine. Results go to ``bench/RESULTS.md`` by hand.

Usage, from the repository root::

    .venv/bin/python bench/prep_bench.py [--source ../shared/cifar10/cifar-10-python.tar.xz]

The output folder is a fresh temporary folder (``--workdir`` picks where), so every run is a full build.
Peak memory is ``getrusage``'s ``ru_maxrss`` for this process and, separately, its children (there are
none today; the number guards against a future subprocess hiding its memory). Exit status 1 means a target
was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from prep import cifar

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "cifar10" / "cifar-10-python.tar.xz"
TARGET_SECONDS = 60.0
TARGET_PEAK_BYTES = 1.5e9


def peak_rss_bytes(who: int) -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(who).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="archive or folder to prepare")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary output folder")
    args = parser.parse_args()

    baseline_bytes = peak_rss_bytes(resource.RUSAGE_SELF)  # interpreter, NumPy and boto3 imported
    with tempfile.TemporaryDirectory(prefix="prep-bench-", dir=args.workdir) as workdir:
        started = time.perf_counter()
        result = cifar.prepare_dataset(args.source, Path(workdir) / "cifar10", force=True)
        wall_s = time.perf_counter() - started
        output_bytes = sum(path.stat().st_size for path in result.out_dir.iterdir())

    peak_self = peak_rss_bytes(resource.RUSAGE_SELF)
    peak_children = peak_rss_bytes(resource.RUSAGE_CHILDREN)
    counts = result.manifest["class_counts"]
    report = {
        "source": str(args.source),
        "source_bytes": args.source.stat().st_size if args.source.is_file() else None,
        "train_images": sum(counts["train"]),
        "test_images": sum(counts["test"]),
        "output_bytes": output_bytes,
        "wall_s": round(wall_s, 2),
        "peak_rss_self_mb": round(peak_self / 1e6, 1),
        "peak_rss_children_mb": round(peak_children / 1e6, 1),
        "rss_before_prepare_mb": round(baseline_bytes / 1e6, 1),
        "images_per_s": round((sum(counts["train"]) + sum(counts["test"])) / wall_s),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report))
    within = wall_s <= TARGET_SECONDS and max(peak_self, peak_children) <= TARGET_PEAK_BYTES
    print(
        f"{'PASS' if within else 'FAIL'}: {wall_s:.1f} s (target <= {TARGET_SECONDS:.0f} s), "
        f"peak RSS {max(peak_self, peak_children) / 1e9:.2f} GB (target <= {TARGET_PEAK_BYTES / 1e9:.1f} GB)",
        file=sys.stderr,
    )
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
