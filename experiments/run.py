"""The lctx entry point: read gin files and overrides, then train, evaluate, generate or report.

  python -m experiments.run --gin_file=gin/quickstart.gin --workdir=/tmp/run \
      [--gin_file=more.gin ...] [--gin.NAME=VALUE ...]

One process of a multi-process run (launch/local.sh, launch/slurm.sbatch, launch/tpu_pod.sh) adds
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or `--distributed` to let JAX
detect the cluster; every process runs the same command otherwise.

`--gin.NAME=VALUE` becomes the gin binding `NAME = VALUE`; a VALUE that is not gin syntax (a
number, True/False/None, a quoted string, a list, tuple or dict, an @reference or a %macro) is
taken as a string, so `--gin.RunConfig.mode=generate`, `--gin.DataConfig.tokenizer=/abs/tok.json`
and `--gin.ModelConfig.mixers=gla+swa` work without shell quoting. Every config is built and
checked before anything is traced or compiled.

Exit status: 0 done; 2 a configuration or usage error (a bad binding or flag, an unusable or busy
workdir, a checkpoint that does not match the configured model), reported before anything is
written; 3 training diverged (the last good checkpoint is kept); 4 a runtime failure (a corrupt or
unreadable file, a full disk, an error inside a library), with a message naming the file.
"""

import argparse
import ast
import dataclasses
import logging
import os
import re
import sys
import traceback

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("train", "attention_transfer", "eval", "generate", "spike_stats", "longeval",
         "doc_loss")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """mode: "train" (train or resume in the workdir), "attention_transfer" (train only a
  converted hybrid's new parameters to match each layer's softmax teacher, TransferConfig,
  lctx/transfer.py; then "train" from it with the LM loss), "eval" (evaluate the latest checkpoint),
  "generate" (continue GenerateConfig.prompt with the latest checkpoint), "spike_stats" (the
  spiking statistics of the latest checkpoint, experiments/spike_stats.py), "longeval"
  (recall tasks over lengths x needle depths, LongEvalConfig, lctx/evals/longeval.py) or
  "doc_loss" (loss by position from each held-out document's start, DocLossConfig,
  lctx/evals/doc_loss.py)."""

  mode: str = "train"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"RunConfig.mode={self.mode!r}: allowed values are {list(MODES)}")


EXIT_CONFIG, EXIT_DIVERGED, EXIT_RUNTIME = 2, 3, 4
_GIN_SYNTAX_START = ("@", "%", "[", "(", "{", "'", '"')


def _is_gin_value(value: str) -> bool:
  """Whether VALUE is written in gin syntax rather than meant as a bare string."""
  value = value.strip()
  if not value or value.startswith(_GIN_SYNTAX_START) or value in ("True", "False", "None"):
    return bool(value)
  try:
    ast.literal_eval(value)  # numbers: 3, -1, 1e-3
    return True
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return False


def binding_from_flag(name: str, value: str) -> str:
  """`--gin.NAME=VALUE` -> "NAME = VALUE", quoting VALUE as a string unless it is gin syntax."""
  if not _is_gin_value(value):
    value = repr(value)
  return f"{name} = {value}"


def parse_args(argv: list[str]):
  parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; later files override earlier ones)")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
  group = parser.add_argument_group(
      "multi-process runs (launch/ starts the processes; lctx/distributed.py)")
  group.add_argument("--coordinator_address", default="",
                     help="host:port of process 0 (with --num_processes and --process_id)")
  group.add_argument("--num_processes", type=int, default=None, help="processes in the run")
  group.add_argument("--process_id", type=int, default=None, help="this process's index")
  group.add_argument("--distributed", action="store_true",
                     help="join a multi-process run found by JAX's cluster auto-detection "
                          "(SLURM, Open MPI, Cloud TPU VMs, GKE, JAX_COORDINATOR_ADDRESS)")
  group.add_argument("--initialization_timeout", type=int, default=300,
                     help="seconds to wait for every process to join")
  group.add_argument("--heartbeat_timeout", type=int, default=60,
                     help="seconds after which a silent process counts as lost and the run stops")
  group.add_argument("--shutdown_timeout", type=int, default=300,
                     help="seconds the processes wait for each other at exit")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    match = re.match(r"^--gin\.([^=]+)=(.*)$", arg, re.S)
    if not match:
      parser.error(f"unrecognized argument {arg!r} (gin overrides are --gin.NAME=VALUE)")
    bindings.append((arg, binding_from_flag(match.group(1), match.group(2))))
  return args, bindings


def load_configs(gin_files: list[str], bindings: list) -> dict:
  """Parses gin and builds every config; raises ValueError naming the bad setting.

  `bindings` are gin binding strings, or (flag, binding) pairs whose errors name the flag.
  """
  from lctx import configurables  # imported here so `--help` stays instant

  configurables.register(RunConfig)
  gin.clear_config()
  # Includes are written relative to the repository root (`include 'gin/models/tiny.gin'`);
  # the search path makes them resolve from any working directory.
  if REPO_ROOT not in gin.config._LOCATION_PREFIXES:  # no public getter for the search path
    gin.add_config_file_search_path(REPO_ROOT)
  if not gin_files:
    raise ValueError("--gin_file: give at least one gin file, e.g. gin/quickstart.gin")
  files = []
  for path in gin_files:
    found = [p for p in (path, os.path.join(REPO_ROOT, path)) if os.path.exists(p)]
    if not found:
      raise ValueError(f"--gin_file={path}: no such file (looked in . and {REPO_ROOT})")
    files.append(os.path.abspath(found[0]))
  gin_errors = (ValueError, SyntaxError, KeyError, IOError)
  try:
    gin.parse_config_files_and_bindings(files, None, finalize_config=False)
  except gin_errors as e:
    raise ValueError(f"gin: {e}") from None
  for item in bindings:  # one at a time, so an error names the flag the user wrote
    flag, binding = item if isinstance(item, tuple) else (item, item)
    try:
      gin.parse_config(binding)
    except gin_errors as e:
      raise ValueError(f"{flag}: gin cannot use it as `{binding}`: {e}") from None
  gin.finalize()
  configs = {}
  for section, cls in {"run": RunConfig, **configurables.SECTIONS}.items():
    try:
      configs[section] = configurables.configured(cls)
    except (ValueError, TypeError) as e:
      raise ValueError(str(e)) from None
  for message in configurables.unused_mixer_bindings(configs["model"]):
    logging.getLogger("lctx").warning(message)
  return configs


def _in_project(filename: str) -> bool:
  """Whether `filename` is this repository's own code (not a virtualenv inside it)."""
  path = os.path.abspath(filename)
  return path.startswith(REPO_ROOT + os.sep) and os.sep + ".venv" + os.sep not in path


def raised_in_project(exc: BaseException) -> bool:
  """Whether `exc` was raised by this repository's own code (its checks of the user's input)."""
  frames = traceback.extract_tb(exc.__traceback__)
  return bool(frames) and _in_project(frames[-1].filename)


def _runtime_failure(exc: BaseException) -> str:
  """One paragraph on a runtime failure: what, the file it names, and where it was raised."""
  frames = traceback.extract_tb(exc.__traceback__)
  where = ""
  if frames:
    ours = [f for f in frames if _in_project(f.filename)]
    where = f" (raised at {frames[-1].filename}:{frames[-1].lineno}"
    if ours and ours[-1] is not frames[-1]:
      where += f", called from {os.path.relpath(ours[-1].filename, REPO_ROOT)}:{ours[-1].lineno}"
    where += ")"
  filename = getattr(exc, "filename", None)
  named = f" [file: {filename}]" if filename else ""
  return f"{type(exc).__name__}: {exc}{named}{where}"


def main(argv: list[str] | None = None) -> int:
  args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from lctx import distributed
  from lctx import workdir as workdir_lib
  try:
    dist = distributed.DistributedConfig(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, auto=args.distributed,
        initialization_timeout=args.initialization_timeout,
        heartbeat_timeout=args.heartbeat_timeout, shutdown_timeout=args.shutdown_timeout)
    configs = load_configs(args.gin_file, bindings)
    workdir = workdir_lib.prepare(args.workdir)
  except ValueError as e:
    print(f"lctx: configuration error: {e}", file=sys.stderr)
    return EXIT_CONFIG
  # The operative config is written by the mode once the workdir's checkpoint is known to match.
  configs["gin"] = gin.operative_config_str()
  if dist.enabled:  # before anything touches a device
    try:
      distributed.initialize(dist)
    except RuntimeError as e:
      print(f"lctx: runtime failure: {e}", file=sys.stderr)
      return EXIT_RUNTIME
    print(f"lctx: {distributed.summary()}", flush=True)
    try:
      distributed.check_same_config(configs["gin"])
    except ValueError as e:
      print(f"lctx: configuration error: {e}", file=sys.stderr)
      return EXIT_CONFIG

  from experiments import modes  # heavy imports (jax) only after the config is known good
  from lctx.errors import RunFailure
  from lctx.trainer import TrainingDiverged
  try:
    return modes.MODES[configs["run"].mode](workdir, configs)
  except TrainingDiverged as e:
    print(f"lctx: training diverged: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  except RunFailure as e:
    print(f"lctx: runtime failure: {e}", file=sys.stderr)
    return EXIT_RUNTIME
  except ValueError as e:
    if raised_in_project(e):  # the project's own checks of settings, paths and checkpoints
      print(f"lctx: error: {e}", file=sys.stderr)
      return EXIT_CONFIG
    print(f"lctx: runtime failure: {_runtime_failure(e)}", file=sys.stderr)
    return EXIT_RUNTIME
  except OSError as e:
    print(f"lctx: runtime failure: {_runtime_failure(e)}", file=sys.stderr)
    return EXIT_RUNTIME


if __name__ == "__main__":
  sys.exit(main())
