"""What a checkpoint's manifest costs next to the save it completes: a weights file of --size-gb is
written with safetensors (as the final model and full-model checkpoints are) and with torch.save
(as optimizer states are), then checksummed as the manifest does (xxh3-128 over the whole file),
and the same file is read without hashing, to show what reading alone costs. Also the other
checksums considered (stdlib sha256, blake2b, crc32) over the same bytes in memory.

    python benchmarks/bench_manifest.py                  # 1 GiB in a temporary folder
    python benchmarks/bench_manifest.py --size-gb 4 --folder /path/on/the/checkpoint/disk

Each figure is the median of --repeats runs. The file is read back from the page cache (what a
manifest written right after the save sees); a resume reads it from disk, where the disk's read
speed bounds hashing and loading alike.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib

import torch
import xxhash
from safetensors.torch import save_file

from chatglm3_finetune.train.manifest import BLOCK_SIZE, file_checksum


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_only(path: str) -> None:
    buffer = bytearray(BLOCK_SIZE)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the weights file, in GiB")
    parser.add_argument("--folder", default=None, help="where to write it (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    gib = args.size_gb
    tensor = torch.randn(int(gib * 2**30) // 4)
    folder = tempfile.mkdtemp(prefix="bench-manifest-", dir=args.folder)
    weights, states = os.path.join(folder, "model.safetensors"), os.path.join(folder, "optimizer.pt")
    try:
        rows = [("write, safetensors", timed(lambda: save_file({"w": tensor}, weights), args.repeats)),
                ("write, torch.save", timed(lambda: torch.save({"w": tensor}, states), args.repeats)),
                ("read only", timed(lambda: read_only(weights), args.repeats)),
                ("read + xxh3-128 (the manifest)", timed(lambda: file_checksum(weights), args.repeats))]
        memory = memoryview(tensor.numpy()).cast("B")
        for name, checksum in (("xxh3-128", lambda: xxhash.xxh3_128(memory).digest()),
                               ("crc32", lambda: zlib.crc32(memory)),
                               ("blake2b", lambda: hashlib.blake2b(memory).digest()),
                               ("sha256", lambda: hashlib.sha256(memory).digest())):
            rows.append((f"{name} in memory", timed(checksum, args.repeats)))
    finally:
        for path in (weights, states):
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(folder)

    save = rows[0][1]
    print(f"{gib:g} GiB, median of {args.repeats}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':34} {'seconds':>8} {'GiB/s':>7} {'x safetensors write':>20}")
    for name, seconds in rows:
        print(f"{name:34} {seconds:8.3f} {gib / seconds:7.2f} {seconds / save:20.2f}")


if __name__ == "__main__":
    main()
