"""Make the CIFAR-10 subset shipped as mimkit/assets/cifar10_subset.tar.gz.

    python tools/make_cifar_subset.py cifar10-jpeg.tar.gz src/mimkit/assets/cifar10_subset.tar.gz

Takes the first N train and M test images of every class (by file name; the numbering follows
CIFAR-10's own shuffled order) from a tarball in image-folder JPEG layout
(`[top/]train/<class>/NNNN.jpg`, `[top/]test/<class>/NNNN.jpg`) and writes them, with their
original JPEG bytes, as `train/<class>/NNNN.jpg` and `test/<class>/NNNN.jpg` into a tar sorted
by name, with fixed owner, mode and times, gzipped with mtime 0: the output bytes depend only on
the input and the counts.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import tarfile
from collections import defaultdict

MTIME = 1553990400  # the source tarball's member time (2019-03-31), fixed


def select(src: str, per_class: dict[str, int]) -> dict[str, bytes]:
    """Name "split/class/file" -> bytes of the first per_class[split] files of every class."""
    by_class = defaultdict(dict)
    with tarfile.open(src, "r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            wanted = len(parts) >= 3 and parts[-3] in per_class and not parts[-1].startswith(".")
            if member.isfile() and wanted:
                by_class[parts[-3], parts[-2]]["/".join(parts[-3:])] = tar.extractfile(member).read()
    chosen = {}
    for (split, _), files in by_class.items():
        chosen.update((name, files[name]) for name in sorted(files)[: per_class[split]])
    return chosen


def write_tar(files: dict[str, bytes], out: str) -> None:
    """Write files (with their folders) as a reproducible .tar.gz, atomically."""
    dirs = {"/".join(name.split("/")[:k]) for name in files for k in (1, 2)}
    tmp = out + ".tmp"
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(dirs | set(files)):
                info = tarfile.TarInfo(name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
                if name in files:
                    info.size, info.mode = len(files[name]), 0o644
                    tar.addfile(info, io.BytesIO(files[name]))
                else:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="CIFAR-10 JPEG tarball, e.g. cifar10-jpeg.tar.gz")
    parser.add_argument("out", help="output .tar.gz")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    files = select(args.src, {"train": args.train_per_class, "test": args.test_per_class})
    write_tar(files, args.out)
    counts = defaultdict(int)
    for name in files:
        counts[name.split("/")[0]] += 1
    with open(args.out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"{args.out}: {dict(counts)} images, {os.path.getsize(args.out):,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
