"""JAX's distributed runtime for runs of several processes (launch/ starts them).

`experiments.run` calls `initialize` before anything touches a device, when it is launched as
one of several processes: with explicit `--coordinator_address/--num_processes/--process_id`, or
with `--distributed` (JAX's cluster auto-detection: SLURM, Open MPI, Cloud TPU VMs, GKE; or
`JAX_COORDINATOR_ADDRESS` and the JAX_* variables). The timeouts are settings: a coordinator
that never answers fails after `initialization_timeout` seconds. When a process is lost, the
others stop at once if a collective breaks (gloo's own error, which does not name the lost
process: the launcher names it), or else after about `heartbeat_timeout` seconds, when JAX's
coordination service ends them with a message naming the unhealthy process. On CPU the processes
exchange arrays through gloo.

After start-up every process prints one summary line (process, local devices, global devices)
and the processes compare their operative configs (`check_same_config`): a process launched with
other settings is refused by name of the differing bindings, before anything compiles.
"""

import dataclasses
import difflib
import hashlib
import socket
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process run (from experiments.run's flags).

  Attributes:
    coordinator_address: host:port of process 0's coordination service ("" with `auto`: JAX
      finds it).
    num_processes, process_id: the run's process count and this process's index (None with
      `auto`).
    auto: let JAX detect the cluster (SLURM, Open MPI, TPU VMs, GKE, JAX_* variables) for
      whatever is not given.
    initialization_timeout: seconds to wait for every process to join.
    heartbeat_timeout: seconds without a heartbeat after which a process counts as lost and the
      run stops.
    shutdown_timeout: seconds the processes wait for each other at exit.
  """

  coordinator_address: str = ""
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  initialization_timeout: int = 300
  heartbeat_timeout: int = 60
  shutdown_timeout: int = 300

  def __post_init__(self):
    explicit = (bool(self.coordinator_address), self.num_processes is not None,
                self.process_id is not None)
    if any(explicit) and not all(explicit) and not self.auto:
      raise ValueError("--coordinator_address, --num_processes and --process_id go together "
                       "(or add --distributed to let JAX detect the missing ones); got "
                       f"--coordinator_address={self.coordinator_address!r} "
                       f"--num_processes={self.num_processes} --process_id={self.process_id}")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"--num_processes must be >= 1, got {self.num_processes}")
    if self.process_id is not None and self.num_processes is not None and not (
        0 <= self.process_id < self.num_processes):
      raise ValueError(f"--process_id={self.process_id} must lie in [0, --num_processes="
                       f"{self.num_processes})")
    for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1 second, got {getattr(self, name)}")
    if self.coordinator_address and ":" not in self.coordinator_address:
      raise ValueError(f"--coordinator_address={self.coordinator_address!r}: give host:port")

  @property
  def enabled(self) -> bool:
    return self.auto or bool(self.coordinator_address)


def initialize(cfg: DistributedConfig) -> None:
  """Joins the run's coordination service (no-op for a single-process run).

  Raises RuntimeError naming the settings when the coordinator cannot be reached in
  `initialization_timeout` seconds or the cluster cannot be detected.
  """
  if not cfg.enabled:
    return
  import jax
  if cfg.coordinator_address and cfg.process_id not in (None, 0):
    _wait_for_coordinator(cfg)  # JAX aborts the process when it cannot connect
  print(f"lctx: joining the run at {cfg.coordinator_address or '(auto-detected)'} as process "
        f"{cfg.process_id if cfg.process_id is not None else '(auto)'} of "
        f"{cfg.num_processes or '(auto)'}", flush=True)
  try:
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes, process_id=cfg.process_id,
        initialization_timeout=cfg.initialization_timeout,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout,
        shutdown_timeout_seconds=cfg.shutdown_timeout)
  except Exception as e:  # XlaRuntimeError (deadline exceeded, unavailable), ValueError, ...
    where = (f"--coordinator_address={cfg.coordinator_address}" if cfg.coordinator_address
             else "--distributed (JAX's cluster auto-detection)")
    text = " ".join(str(e).split())[:600]
    raise RuntimeError(
        f"the distributed runtime did not start ({where}, --num_processes={cfg.num_processes}, "
        f"--process_id={cfg.process_id}, --initialization_timeout={cfg.initialization_timeout} "
        f"s): {type(e).__name__}: {text}. Check that every process was launched, that process "
        "0 is reachable at that address and that the port is free") from None


def _wait_for_coordinator(cfg: DistributedConfig) -> None:
  """Waits until process 0's coordination service accepts connections; RuntimeError naming
  --coordinator_address after --initialization_timeout seconds."""
  host, port = cfg.coordinator_address.rsplit(":", 1)
  deadline = time.monotonic() + cfg.initialization_timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"the distributed runtime did not start (--coordinator_address="
            f"{cfg.coordinator_address}): nothing accepted a connection there within "
            f"--initialization_timeout={cfg.initialization_timeout} s ({e.strerror or e}); "
            "start process 0 (it serves that address), or give its host and a free port")
      time.sleep(0.25)


def summary() -> str:
  """One line about this process: its index, its devices and the run's."""
  import jax
  local = jax.local_devices()
  kinds = sorted({d.platform for d in local})
  return (f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local "
          f"{'/'.join(kinds)} devices (ids {local[0].id}..{local[-1].id}) of "
          f"{jax.device_count()} in the run")


def _gather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data` (all processes call this with their own)."""
  from jax.experimental import multihost_utils
  length = np.asarray([len(data)], np.int32)  # int64 would be cut to int32 without x64
  lengths = np.asarray(multihost_utils.process_allgather(length)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(row[:n]) for row, n in zip(gathered, lengths)]


def check_same_config(config_text: str) -> None:
  """Every process must run the same operative config; ValueError naming the differences.

  The hashes are compared first; only when they differ are the texts exchanged and diffed.
  """
  import jax
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(config_text.encode()).digest()
  digests = _gather_bytes(digest)
  if len(set(digests)) == 1:
    return
  texts = [t.decode() for t in _gather_bytes(config_text.encode())]
  first = next(i for i, d in enumerate(digests) if d != digests[0])
  ours, theirs = texts[0].splitlines(), texts[first].splitlines()
  changed = [line for line in difflib.unified_diff(ours, theirs, lineterm="", n=0)
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
  raise ValueError(
      f"process {first} was launched with another config than process 0 (every process of a "
      f"run must get the same --gin_file and --gin flags); process 0 vs process {first}: "
      + "; ".join(changed[:12]))


def sum_distinct(counts: np.ndarray, key: int) -> np.ndarray:
  """The sum of integer `counts` over processes with distinct `key`s (processes holding the same
  block of rows, whose counts are equal, count once); `counts` itself in a single-process run.
  (Exchanged as int32, exact below 2**31: JAX without x64 would round int64 or float64.)"""
  import jax
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils
  if np.max(counts, initial=0) >= 2**31:
    raise ValueError("sum_distinct: counts of 2**31 or more cannot be exchanged exactly")
  keys = np.asarray(multihost_utils.process_allgather(np.asarray([key], np.int32))).reshape(-1)
  values = np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int32)))
  firsts = [i for i, k in enumerate(keys) if k not in keys[:i]]
  return values[firsts].astype(np.float64).sum(axis=0)
