"""A slow writer for the --follow test: python -m tests.follow_writer PATH T N DELAY"""
import sys
import time

from tests.synthetic import trajectory, write_store

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
store.close()
print("done", flush=True)
