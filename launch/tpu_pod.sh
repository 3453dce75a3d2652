#!/usr/bin/env bash
# Cloud TPU pod slice: the same training command on every worker VM of the slice at once
# (gcloud ... tpu-vm ssh --worker=all); jax.distributed.initialize() finds the other workers.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh CONFIG WORKDIR [--config.x=value ...]
#   INSTALL=1 TPU_NAME=... ZONE=... bash launch/tpu_pod.sh ...   # first pip-install colorflax on every worker
#   DRY_RUN=1 TPU_NAME=... ZONE=... bash launch/tpu_pod.sh ...   # print the gcloud commands only
#
# Needs: a TPU VM slice (gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type
# v4-32 --version tpu-ubuntu2204-base), this checkout at REMOTE_DIR (default ~/colorflax) on
# every worker (git clone, or gcloud compute tpus tpu-vm scp --recurse --worker=all), the
# features cache at the same path on every worker (each reads only its own slice of every
# batch, so a local copy or a shared mount both work), and WORKDIR on storage all workers
# share (a Filestore/NFS mount, or gcsfuse), where orbax writes checkpoints collectively.
# Set PROJECT to pass --project. Every worker runs the same config: use per-device batches,
# e.g. --config.per_device_batch_size=32, and --config.model.dtype=bfloat16.
# Training runs in the foreground of the ssh sessions: if they drop, every worker stops after
# the same step with a checkpoint (SIGHUP or the broken output pipe; README, Training), and
# running this again resumes. For runs longer than a connection lasts, start this script in
# tmux on a machine that stays connected.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR [--config.x=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice's name}"
: "${ZONE:?set ZONE to the slice's zone}"
remote_dir=${REMOTE_DIR:-'~/colorflax'}
config=$1 workdir=$2
shift 2
ssh_all=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all)
train="cd $remote_dir && python3 -m colorflax.train --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir") --config.distributed=True"
for arg in "$@"; do train+=" $(printf '%q' "$arg")"; done
run() { if [ -n "${DRY_RUN:-}" ]; then printf '%s\n' "$*"; else "$@"; fi; }
if [ -n "${INSTALL:-}" ]; then
  run "${ssh_all[@]}" --command "cd $remote_dir && python3 -m pip install -q -e '.[tpu]'"
fi
run "${ssh_all[@]}" --command "$train"
