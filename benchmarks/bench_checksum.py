"""What checking a feature cache costs: the sha256 of `features.arrow`, as `open_features` takes it before a reuse.

    python benchmarks/bench_checksum.py            # a 171 MB file: the cache of 400 GSM8K problems
    python benchmarks/bench_checksum.py --mb 500

Writes a file of random bytes the size of a cache to a temporary folder, hashes it --rounds times with the package's
own `_file_checksum` (4 MiB reads) and prints the median throughput, with what it means for the caches of
docs/training.md: 400 GSM8K train problems (37,005 trained positions x 4,616 bytes = 170.8 MB, softmax head on
SmolLM2-135M) and the whole of GSM8K train (3.1 GB). The file was just written, so it is read from the page cache:
this is the hash's cost; a cache on a cold disk also pays one read of the file, which the first epoch would pay anyway.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from peft_backattn.workbench.features import _file_checksum

CACHES_MB = {"400 GSM8K problems": 170.8, "all of GSM8K train": 3080.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=170.8, help="size of the file, in MB (10**6 bytes)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.arrow"
        with open(path, "wb") as file:
            for start in range(0, size, 1 << 24):
                file.write(os.urandom(min(1 << 24, size - start)))
        seconds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            _file_checksum(path)
            seconds.append(time.perf_counter() - start)
    rate = size / 1e6 / statistics.median(seconds)
    print(
        f"sha256 of {size / 1e6:.1f} MB: median {statistics.median(seconds):.3f} s of {args.rounds}, {rate:.0f} MB/s"
    )
    for name, megabytes in CACHES_MB.items():
        print(f"  the cache of {name} ({megabytes:,.1f} MB): {megabytes / rate:.2f} s per reuse")


if __name__ == "__main__":
    main()
