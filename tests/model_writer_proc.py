"""The writer process of tests/test_model_check.py: runs store calls sent as JSON lines on stdin.

Each line is one call; the answer line is {"ok": result} or {"error": class name, "typed": bool,
"message": ...}. Snapshots travel as a seed plus a damage (see ``snapshot``), so the test process
rebuilds exactly the same values for its reference. No torch import: a kill -9 costs a cheap restart.
"""
import json
import sys
import warnings

import numpy as np

from trajstore import TrajectoryStore, TrajstoreError
from trajstore.layout import ParamLayout, TensorSpec

LAYOUT = ParamLayout([TensorSpec("weight", (4, 3), "float32"), TensorSpec("bias", (4,), "float32")])  # nn.Linear(3, 4)


def snapshot(seed: int, damage: str | None = None):
    """The (16,) float32 snapshot of ``seed``, or a damaged variant an append must refuse (or take)."""
    row = np.random.default_rng(seed).standard_normal(LAYOUT.n).astype(np.float32)
    if damage == "nan":
        row[seed % LAYOUT.n] = np.nan
    elif damage == "short":
        row = row[:-1]
    elif damage == "long":
        row = np.append(row, np.float32(1))
    elif damage == "2d":
        row = row.reshape(4, 4)
    elif damage == "complex":
        row = row.astype(np.complex64)
    elif damage == "bool":
        row = row > 0
    elif damage == "list":
        row = row.tolist()
    elif damage == "float64":  # a real dtype: cast, and recorded
        row = row.astype(np.float64)
    return row


def main() -> None:
    warnings.simplefilter("ignore")  # the stale lock of a killed writer is broken on purpose
    store = None
    for line in sys.stdin:
        call = json.loads(line)
        op = call.pop("op")
        try:
            if op == "create":
                store = TrajectoryStore.create(call["path"], LAYOUT, codec=call["codec"], chunk_size=8, shard_size=8)
                result = None
            elif op == "open":
                store = TrajectoryStore.open(call["path"], "a")
                result = len(store)
            elif op == "append":
                result = store.append(snapshot(call["seed"], call.get("damage")), step=call["step"],
                                      metrics=call.get("metrics"), allow_nonfinite=call.get("allow_nonfinite", False))
            elif op == "flush":
                result = store.flush()
            elif op == "close":
                result = store.close()
            elif op == "truncate_after_step":
                result = store.truncate_after_step(call["step"])
            else:
                raise ValueError(f"unknown op {op}")
            answer = {"ok": result}
        except Exception as exc:  # noqa: BLE001 -- reported to the test, which judges it
            answer = {"error": type(exc).__name__, "typed": isinstance(exc, TrajstoreError), "message": str(exc)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
