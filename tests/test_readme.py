"""Every `python -m experiments.run` command in README.md runs as written, at tiny size.

The commands are read from the README's bash blocks (continuation lines joined, the set-up before
`&&` dropped) and run in the README's order from a scratch directory that holds the files the
examples name (`data/*.jsonl`), so later commands find the workdirs of earlier ones. Only sizes
are appended (model width, steps, eval batches); each command's files, modes, workdir, device
count and sequence length are its own. Commands that share a device count run in one process.
"""

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
             "--gin.BATCH_SIZE=2",
             "--gin.TrainConfig.eval_batches=1", "--gin.TrainConfig.unigram_batches=1",
             "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.progress_bar=False",
             "--gin.GenerateConfig.max_new_tokens=8"]


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


def test_every_readme_command_runs_as_written(tmp_path):
  commands = readme_commands()
  assert len(commands) >= 8, commands  # the README's examples were found
  (tmp_path / "data").mkdir()
  with open(tmp_path / "data" / "docs.jsonl", "w") as f:
    for i in range(40):
      f.write('{"text": "def f%d(x):\\n    return x * %d\\n"}\n' % (i, i))
  groups: list[tuple[dict, list]] = []  # consecutive commands with the same environment
  for env, argv in commands:
    if not groups or groups[-1][0] != env:
      groups.append((env, []))
    groups[-1][1].append(argv + TINY_SIZE)
  for env, argvs in groups:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], cwd=tmp_path,
                          env=dict(cli.env(), **env), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok (") == len(argvs)
    print("\n".join(l for l in proc.stdout.splitlines() if l.startswith("ok (")))
