"""A reader process for the concurrent-reader campaign: reads a live store until told to stop.

usage: python -m tests.reader_proc PATH N SECONDS
Prints one JSON line: reads done, rows checked, the largest length seen, and every mismatch.
"""
import json
import random
import sys
import time

import numpy as np

from trajstore import TrajectoryStore
from trajstore.errors import NotAStoreError

from .writer_proc import row


def main() -> None:
    path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = random.Random(7)
    reads = rows = longest = 0
    bad: list[str] = []
    deadline = time.monotonic() + seconds
    store = None
    while time.monotonic() < deadline:
        try:
            store = store.refresh() if store is not None else TrajectoryStore.open(path)
        except NotAStoreError:
            time.sleep(0.05)  # the writer has not created it yet
            continue
        t = len(store)
        if t < longest:
            bad.append(f"length went back from {longest} to {t}")
        longest = max(longest, t)
        if not t:
            continue
        for i in {t - 1, rng.randrange(t)}:  # the newest committed row, and any other
            got = store.read(i)
            rows += 1
            if not np.array_equal(got.view(np.uint32), row(i, n).view(np.uint32)):
                bad.append(f"row {i} differs from what was appended (length {t})")
        if store.steps.tolist() != list(range(t)):
            bad.append(f"steps wrong at length {t}")
        reads += 1
    print(json.dumps({"reads": reads, "rows": rows, "longest": longest, "bad": bad[:20]}), flush=True)


if __name__ == "__main__":
    main()
