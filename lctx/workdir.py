"""The run's working directory: checked before anything is built, and locked while training.

`prepare(path)` makes the directory and proves it writable, with an error naming `--workdir` when
it is a file, lies under a file or cannot be written. `WorkdirLock` is an exclusive `flock` on
`<workdir>/.lock` held for the life of a training process: a second run in the same workdir is
refused at start with the pid, host, start time and command of the running one. The kernel
releases the lock when the holder exits, however it exits (SIGKILL included), so a killed run never
leaves a stale lock behind; the file itself stays and is simply locked again by the next run.
"""

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


def prepare(path: str) -> str:
  """Creates `path` if needed and checks that files can be written in it; returns its abspath."""
  workdir = os.path.abspath(path)
  probe = workdir
  while probe and not os.path.exists(probe):  # the nearest existing ancestor
    probe = os.path.dirname(probe)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={path}: {workdir} is a file, not a directory")
  if probe != workdir and not os.path.isdir(probe):
    raise ValueError(f"--workdir={path}: {probe} is a file, so no directory can be made under it")
  try:
    os.makedirs(workdir, exist_ok=True)
    test = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(test, "w") as f:
      f.write("ok")
    os.remove(test)
  except OSError as e:
    raise ValueError(f"--workdir={path}: {workdir} is not writable ({e.strerror or e})") from None
  return workdir


class WorkdirBusy(ValueError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """Exclusive lock of a workdir for one training process (a context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe_holder(fd)
      os.close(fd)
      raise WorkdirBusy(f"--workdir={os.path.dirname(self.path)} is in use by another run "
                        f"({holder}); wait for it to finish, stop it, or choose another "
                        f"--workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _describe_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "its process is still starting"
  return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: "
          f"{info.get('command')}")
