#!/usr/bin/env bash
# The same lctx command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh NAME ZONE [--project P] [--repo_dir DIR] [--dry_run] -- \
#       <python -m experiments.run arguments>
#
# Runs `cd DIR && python -m experiments.run --distributed <arguments>` on all workers through
# `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all`; JAX detects the pod (process
# index, count and coordinator) on each worker. DIR (default: lctx, in the home directory) must hold this repository
# on every worker, and the workdir must be storage every worker sees (a GCS bucket mounted by
# gcsfuse, or NFS). --dry_run prints the gcloud command instead of running it.
set -euo pipefail

usage() {
  echo "usage: $0 NAME ZONE [--project P] [--repo_dir DIR] [--dry_run] -- <experiments.run arguments>" >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
name=$1
zone=$2
shift 2
project=""
repo_dir="lctx"  # relative to the home directory on the workers
dry_run=0
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project) project=$2; shift 2 ;;
    --repo_dir) repo_dir=$2; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    *) usage ;;
  esac
done
[[ $# -gt 0 ]] || usage
shift  # the "--"

run="cd $repo_dir && PYTHONPATH=. python -m experiments.run --distributed"
for arg in "$@"; do
  run+=" $(printf '%q' "$arg")"
done
command=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$run")
if [[ -n $project ]]; then
  command+=(--project "$project")
fi

if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
else
  "${command[@]}"
fi
