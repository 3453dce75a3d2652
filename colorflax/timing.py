"""Timing helpers of the benchmark, shared by its JAX and PyTorch sides."""

import statistics
import time


def median_time(fn, repeats):
  """The median wall time of `repeats` calls of fn()."""
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_sizes(platform):
  """The square matmul sizes whose best time gives a device's peak."""
  return (
      (8192,) if platform != 'cpu' else (2048, 4096)
  )  # CPU: XLA peaks at 2048, oneDNN's AMX at 4096


def best_matmul_flops(matmul, sizes, repeats):
  """max over `sizes` of 2n³ / the median time of matmul(n) (a callable that runs, synchronised)."""
  best = 0.0
  for n in sizes:
    run = matmul(n)
    run()  # warm-up / compilation
    reps = 10 if n <= 2048 else 2
    best = max(
        best, 2.0 * n**3 / (median_time(lambda: [run() for _ in range(reps)], repeats) / reps)
    )
  return best
