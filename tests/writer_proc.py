"""A writer process for crash tests: appends deterministic rows until killed.

usage: python -m tests.writer_proc PATH CODEC N [--fsize-limit-after K]
"""
import json
import resource
import signal
import sys

import numpy as np

from trajstore import TrajectoryStore
from trajstore.layout import ParamLayout, TensorSpec


def row(i: int, n: int) -> np.ndarray:
    return (np.random.default_rng(i).standard_normal(n) * 0.01 + i).astype(np.float32)


def layout(n: int) -> ParamLayout:
    return ParamLayout([TensorSpec("a", (n // 2,), "float32"), TensorSpec("b", (n - n // 2,), "float32")])


def main() -> None:
    path, codec, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    limit_after = int(sys.argv[5]) if len(sys.argv) > 5 else None
    try:
        store = TrajectoryStore.open(path, "a")
    except Exception:
        store = TrajectoryStore.create(path, layout(n), codec=codec, chunk_size=1 << 14, shard_size=1 << 16)
    print(json.dumps({"start": len(store)}), flush=True)
    i = len(store)
    while True:
        if limit_after is not None and i == limit_after:
            store.flush()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the "disk" is now full
            try:
                for j in range(i, i + 3):
                    store.append(row(j, n), step=j)
                store.flush()
                print(json.dumps({"error": None}), flush=True)
            except Exception as exc:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
            try:
                store.close()
            except Exception as exc:
                print(json.dumps({"close_error": type(exc).__name__}), flush=True)
            return
        store.append(row(i, n), step=i, metrics={"i": float(i)})
        i += 1


if __name__ == "__main__":
    main()
