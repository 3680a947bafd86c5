#!/usr/bin/env bash
# N processes of one run on this machine: one coordinator on loopback, CPU collectives (gloo).
#
#   launch/local.sh N [--devices D] [--log_dir DIR] -- <python -m experiments.run arguments>
#
# Every process gets D fake CPU devices (JAX_NUM_CPU_DEVICES; default 1) and the same arguments
# plus --coordinator_address/--num_processes/--process_id. Each process's output goes to
# DIR/process_I.log (default: logs/local-<date>-<time>); process 0's is also shown here. Processes
# that fail are named in the order they end; the exit status is the first failure's (0 when all
# succeed). Running the same command again resumes the run from its last checkpoint.
set -euo pipefail

usage() {
  echo "usage: $0 N [--devices D] [--log_dir DIR] -- <experiments.run arguments>" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
num_processes=$1
shift
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$num_processes'" >&2; exit 2; }
devices=1
log_dir="logs/local-$(date +%Y%m%d-%H%M%S)"
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --devices) devices=$2; shift 2 ;;
    --log_dir) log_dir=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $# -gt 0 ]] || usage
shift  # the "--"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$log_dir"

pids=()
# Ctrl-C or a TERM to this script stops every process of the run.
trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
    "$python" -m experiments.run "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$num_processes" --process_id="$i" > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "launch/local.sh: $num_processes processes (pids ${pids[*]}), coordinator 127.0.0.1:$port, logs in $log_dir" >&2

tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" &
tail_pid=$!

# Report the processes in the order they end: when one is lost (killed, crashed), it is named
# first; the others are stopped by JAX's distributed runtime (at once when a collective breaks,
# else after --heartbeat_timeout seconds) and follow.
status=0
remaining=${#pids[@]}
while [[ $remaining -gt 0 ]]; do
  code=0
  wait -n -p done_pid "${pids[@]}" || code=$?
  remaining=$((remaining - 1))
  for i in "${!pids[@]}"; do
    [[ ${pids[$i]} == "$done_pid" ]] || continue
    if [[ $code -ne 0 ]]; then
      how="status $code"
      [[ $code -gt 128 ]] && how="$how (signal $((code - 128)))"
      echo "launch/local.sh: process $i exited with $how (log: $log_dir/process_$i.log)" >&2
      [[ $status -ne 0 ]] || status=$code
    fi
  done
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
