"""Shared pieces of the benchmark scripts: timing, the machine's matmul peak, tables, CSV, plots.

Benchmarks measure ratios within one run (ours vs a reference vs this machine's dense matmul
peak measured by `matmul_peak_gflops` in the same process), so numbers from different machines are
never mixed.
"""

import csv
import logging
import os
import time

import jax
import jax.numpy as jnp

log = logging.getLogger("lctx.bench")


def time_ms(fn, *args, repeats: int = 3) -> float:
  """Best wall time in ms of `fn(*args)` (already jitted) after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Dense float32 [n, n] @ [n, n] throughput of this machine in GFLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  ms = time_ms(jax.jit(jnp.dot), a, b, repeats=repeats)
  return 2 * n ** 3 / (ms * 1e-3) / 1e9


def available_memory_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux); a large number where it cannot be read."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 1 << 62


def print_table(rows: list[dict], columns: list[str]) -> None:
  """Prints rows as an aligned text table (missing values as '-')."""
  if not rows:
    return
  fmt = lambda v: "-" if v is None or v == "" else (f"{v:.4g}" if isinstance(v, float) else str(v))
  cells = [[fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  for row in cells:
    print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _pyplot(path: str):
  """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log.warning("matplotlib is not installed: no plot written to %s (pip install matplotlib)",
                path)
    return None
  return plt


def plot_lines(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
               title: str) -> bool:
  """Log-log line plot of {label: (xs, ys)}; returns False (and logs) without matplotlib."""
  return plot_panels(path, {title: series}, xlabel, ylabel, yscale="log")


def plot_panels(path: str, panels: dict[str, dict[str, tuple[list, list]]], xlabel: str,
                ylabel: str, *, xscale: str = "log", yscale: str = "linear",
                ylim: tuple[float, float] | None = None) -> bool:
  """One line plot per panel {title: {label: (xs, ys)}}, side by side; returns False (and logs)
  without matplotlib."""
  plt = _pyplot(path)
  if plt is None:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(1 + 5 * len(panels), 4.5), squeeze=False)
  for ax, (title, series) in zip(axes[0], panels.items()):
    for label, (xs, ys) in series.items():
      ax.plot(xs, ys, marker="o", label=label)
    ax.set(xscale=xscale, yscale=yscale, xlabel=xlabel, ylabel=ylabel, title=title)
    xs = sorted({x for xs, _ in series.values() for x in xs})
    if xscale == "log" and 0 < len(xs) <= 12:  # label the measured points, not powers of ten
      ax.set_xticks(xs, [f"{x:g}" for x in xs])
      ax.minorticks_off()
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def plot_heatmap(path: str, values, row_labels, col_labels, xlabel: str, ylabel: str,
                 title: str) -> bool:
  """Heatmap of values [rows, cols] in [0, 1] (NIAH style: green is 1); returns False (and logs)
  without matplotlib."""
  plt = _pyplot(path)
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(col_labels), 1.2 + 0.5 * len(row_labels)))
  image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
  ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True
