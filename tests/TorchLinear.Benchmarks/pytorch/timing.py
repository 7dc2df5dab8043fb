"""What every timing script here shares: one call's median time, and the BLAS library the process loaded.

The scripts beside this file import it (Python puts a script's own folder first on sys.path)."""
import statistics
import time


def per_call(run, batch_seconds=0.05, warmups=10, batches=5):
    """Median seconds per call of run(): warm up, size a batch to about batch_seconds, time that many batches."""
    for _ in range(warmups):
        run()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < batch_seconds:
        run()
        n += 1
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(n):
            run()
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def blas_libraries():
    """The BLAS and LAPACK libraries mapped into this process (call after a first matrix product has loaded them)."""
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "blas" in line.lower() and line.split()[-1].startswith("/")})
