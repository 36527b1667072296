"""A slow writer for the --follow test: python -m tests.follow_writer PATH T N DELAY

After 7 snapshots it waits (up to 60 s, outside the timed appends) for the follower's first Gram: a
follower slow to start on a loaded machine would otherwise see the whole run at once, and the test
could not tell a follower that keeps up from one that extracts once at the end."""
import sys
import time

import zarr

from tests.synthetic import trajectory, write_store


def wait_for_first_gram(path: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        group = zarr.open_group(path, mode="r")
        if "gram" in group and group["gram"].attrs.get("rows", 0) >= 5:
            return
        time.sleep(0.1)


path, t, n, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
x = trajectory(t, n, rank=3)
store = write_store(path, x[:2], close=False)
print("started", flush=True)
for i in range(2, t):
    time.sleep(delay)
    t0 = time.perf_counter()
    store.append(x[i], step=10 * i, epoch=i)
    store.flush()
    print(f"{i} {time.perf_counter() - t0:.3f}", flush=True)
    if i == 6:
        wait_for_first_gram(path)
store.close()
print("done", flush=True)
