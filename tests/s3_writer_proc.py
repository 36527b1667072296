"""A writer process for kill -9 tests on S3: appends deterministic rows to an s3:// store until killed.

usage: python -m tests.s3_writer_proc URL N [--break-lock]

Needs AWS_ENDPOINT_URL and test credentials in its environment (the ``s3`` fixture sets them).
Prints ``{"start": t}`` (the committed count it resumes from) once it holds the lock.
"""
import json
import sys

import numpy as np

from trajstore import TrajectoryStore
from trajstore.errors import NotAStoreError
from trajstore.layout import ParamLayout, TensorSpec


def row(i: int, n: int) -> np.ndarray:
    """Snapshot ``i`` of the deterministic trajectory."""
    return (np.random.default_rng(i).standard_normal(n) * 0.01 + i).astype(np.float32)


def layout(n: int) -> ParamLayout:
    return ParamLayout([TensorSpec("a", (n // 2,), "float32"), TensorSpec("b", (n - n // 2,), "float32")])


def main() -> None:
    url, n = sys.argv[1], int(sys.argv[2])
    try:
        store = TrajectoryStore.open(url, "a", break_lock="--break-lock" in sys.argv[3:])
    except NotAStoreError:
        store = TrajectoryStore.create(url, layout(n), chunk_size=1 << 12, shard_size=1 << 13)
    i = len(store)
    print(json.dumps({"start": i}), flush=True)
    while True:
        store.append(row(i, n), step=i, metrics={"i": float(i)})
        i += 1


if __name__ == "__main__":
    main()
