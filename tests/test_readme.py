"""Every `python -m experiments.run` command in README.md runs as written (tests/readme.py)."""

from tests.readme import readme_commands


def test_the_readme_commands_are_found():
  commands = readme_commands()
  flags = [" ".join(argv) for _, argv in commands]
  assert len(commands) >= 8, flags
  assert any("gin/parallel/sequence.gin" in f for f in flags)  # the sequence-parallel example
  assert any("mode=spike_stats" in f for f in flags)


def test_every_readme_command_runs_as_written(readme_runs):
  for group in readme_runs.groups:
    proc = group.proc
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok (") == len(group.argvs), proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
