"""The `python -m experiments.run` commands of README.md, run as written at tiny size.

The commands are read from the README's bash blocks (continuation lines joined, the set-up before
`&&` dropped) and run in the README's order from a scratch directory that holds the files the
examples name (`data/*.jsonl`), so later commands find the workdirs of earlier ones. Only sizes
are appended (model width, steps, batch, eval batches); each command's files, modes, workdir,
device count and sequence length are its own. The commands with the same environment run in one
process, in the README's order (a command reads only the workdirs of earlier commands of its own
environment, so the groups run one after another). The session fixture `readme_runs` (conftest.py) runs them once for every test
that reads their results.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

from tests import cli

README = os.path.join(cli.ROOT, "README.md")

TINY_SIZE = ["--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64", "--gin.STEPS=1",
             "--gin.BATCH_SIZE=2", "--gin.TrainConfig.eval_batches=1",
             "--gin.TrainConfig.unigram_batches=1", "--gin.TrainConfig.eval_every=0",
             "--gin.TrainConfig.progress_bar=False", "--gin.GenerateConfig.max_new_tokens=8"]

_RUNNER = textwrap.dedent("""
    import json, sys, time
    from experiments.run import main
    for argv in json.loads(sys.argv[1]):
      start = time.perf_counter()
      code = main(argv)
      if code:
        sys.exit(f"exit status {code}: python -m experiments.run {' '.join(argv)}")
      print(f"ok ({time.perf_counter() - start:.1f} s):", " ".join(argv), flush=True)
""")


def _env(command_env: dict) -> dict:
  """The test environment with a command's own variables; its XLA_FLAGS join the suite's."""
  env = dict(cli.env(), **command_env)
  if "XLA_FLAGS" in command_env:
    env["XLA_FLAGS"] = f"{cli.xla_flags()} {command_env['XLA_FLAGS']}".strip()
  return env


def readme_commands() -> list[tuple[dict, list[str]]]:
  """(environment variables, argv after `python -m experiments.run`) of each README command."""
  with open(README) as f:
    text = f.read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("&&")[-1].strip()
      if "python -m experiments.run" not in line:
        continue
      words = shlex.split(line)
      start = words.index("python")
      env = dict(w.split("=", 1) for w in words[:start])
      commands.append((env, words[start + 3:]))
  return commands


@dataclasses.dataclass
class Group:
  env: dict
  argvs: list
  proc: subprocess.CompletedProcess = None


@dataclasses.dataclass
class ReadmeRuns:
  directory: str
  groups: list

  def workdir(self, name: str) -> str:
    return os.path.join(self.directory, "runs", name)

  def group_of(self, workdir_name: str) -> Group:
    """The (first) group whose commands use `--workdir=runs/NAME`."""
    flag = f"--workdir=runs/{workdir_name}"
    return next(g for g in self.groups if any(flag in argv for argv in g.argvs))


def run_readme_commands(directory: str) -> ReadmeRuns:
  os.makedirs(os.path.join(directory, "data"), exist_ok=True)
  with open(os.path.join(directory, "data", "docs.jsonl"), "w") as f:
    for i in range(40):
      f.write(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n")
  groups: list[Group] = []
  for env, argv in readme_commands():
    group = next((g for g in groups if g.env == env), None)
    if group is None:
      group = Group(env, [])
      groups.append(group)
    group.argvs.append(argv + TINY_SIZE)
  for group in groups:
    group.proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(group.argvs)],
                                cwd=directory, env=_env(group.env),
                                capture_output=True, text=True, timeout=600)
  return ReadmeRuns(directory, groups)
