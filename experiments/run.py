"""The lctx entry point: read gin files and overrides, then train, evaluate, generate or report.

  python -m experiments.run --gin_file=gin/quickstart.gin --workdir=/tmp/run \
      [--gin_file=more.gin ...] [--gin.NAME=VALUE ...]

`--gin.NAME=VALUE` becomes the gin binding `NAME = VALUE`; a bare word VALUE (no quotes, not a
number, True/False/None, @reference or %macro) is taken as a string, so
`--gin.RunConfig.mode=generate` works without shell quoting. Every config is built and checked
before anything is traced or compiled; a bad binding exits with status 2 and a message naming it.
"""

import argparse
import dataclasses
import logging
import os
import re
import sys

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("train", "eval", "generate", "spike_stats")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """mode: "train" (train or resume in the workdir), "eval" (evaluate the latest checkpoint),
  "generate" (continue GenerateConfig.prompt with the latest checkpoint) or "spike_stats" (the
  spiking statistics of the latest checkpoint, experiments/spike_stats.py)."""

  mode: str = "train"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"RunConfig.mode={self.mode!r}: allowed values are {list(MODES)}")


_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./]*$")


def binding_from_flag(name: str, value: str) -> str:
  """`--gin.NAME=VALUE` -> "NAME = VALUE", quoting a bare-word VALUE as a string."""
  if _BARE_WORD.match(value) and value not in ("True", "False", "None"):
    value = repr(value)
  return f"{name} = {value}"


def parse_args(argv: list[str]):
  parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; later files override earlier ones)")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    match = re.match(r"^--gin\.([^=]+)=(.*)$", arg, re.S)
    if not match:
      parser.error(f"unrecognized argument {arg!r} (gin overrides are --gin.NAME=VALUE)")
    bindings.append(binding_from_flag(match.group(1), match.group(2)))
  return args, bindings


def load_configs(gin_files: list[str], bindings: list[str]) -> dict:
  """Parses gin and builds every config; raises ValueError naming the bad setting."""
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
  try:
    gin.parse_config_files_and_bindings(files, bindings)
  except (ValueError, SyntaxError, KeyError, IOError) as e:
    raise ValueError(f"gin: {e}") from None
  configs = {}
  for section, cls in {"run": RunConfig, **configurables.SECTIONS}.items():
    try:
      configs[section] = configurables.configured(cls)
    except (ValueError, TypeError) as e:
      raise ValueError(str(e)) from None
  configs["model"] = configurables.with_bound_subconfigs(configs["model"])
  return configs


def main(argv: list[str] | None = None) -> int:
  args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    configs = load_configs(args.gin_file, bindings)
  except ValueError as e:
    print(f"lctx: configuration error: {e}", file=sys.stderr)
    return 2
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  mode = configs["run"].mode
  if mode == "train":
    with open(os.path.join(workdir, "config.gin"), "w") as f:
      f.write(gin.operative_config_str())

  from experiments import modes  # heavy imports (jax) only after the config is known good
  from lctx.trainer import TrainingDiverged
  try:
    return modes.MODES[mode](workdir, configs)
  except ValueError as e:  # user-caused errors found before compiling (e.g. data paths)
    print(f"lctx: error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"lctx: training diverged: {e}", file=sys.stderr)
    return 3


if __name__ == "__main__":
  sys.exit(main())
