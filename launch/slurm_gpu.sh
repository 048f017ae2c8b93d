#!/usr/bin/env bash
# Multi-node GPU training under SLURM: writes a batch script that starts one
# python -m ddnn_jax.main per node (each process drives all GPUs of its node)
# and submits it with sbatch. See --help and launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm_gpu.sh --workdir DIR [options]

Submits a SLURM job that trains on several GPU nodes: one process per node,
joined through a JAX coordinator on the first node.

  --workdir DIR           checkpoints and logs (required): a directory on a
                          filesystem every node shares, or gs://...
  --nodes N               default 2
  --gpus-per-node G       default 8
  --partition NAME        default: the cluster's default partition
  --time D-HH:MM:SS       time limit, default 24:00:00
  --job-name NAME         default ddnn_jax
  --config FILE[:ARG]     default configs/imagenet.py (e.g. configs/imagenet.py:smoke)
  --override KEY=VALUE    passed on as --config.KEY=VALUE; repeatable
  --venv PATH             virtual environment with the package installed,
                          default venv in this checkout (./venv from its root)
  --port PORT             coordinator port on the first node, default 12355
  --sbatch-option OPT     one more '#SBATCH OPT' line, e.g. --account=abc or
                          --exclusive; repeatable
  --dry-run               print the sbatch command with the job script, submit nothing
  -h, --help              this help

Example:
  launch/slurm_gpu.sh --nodes 4 --workdir /shared/runs/r50_ekd --dry-run
EOF
}

nodes=2 gpus_per_node=8 partition='' time_limit=24:00:00 job_name=ddnn_jax
config=configs/imagenet.py workdir='' venv=$ROOT/venv port=12355 dry_run=0
config_flags=''     # ' --config.KEY=VALUE' per --override, quoted for bash
sbatch_options=''   # extra '#SBATCH OPT' lines

while (($#)); do
  case $1 in
    --nodes) need_value "$@"; nodes=$2; shift ;;
    --gpus-per-node) need_value "$@"; gpus_per_node=$2; shift ;;
    --partition) need_value "$@"; partition=$2; shift ;;
    --time) need_value "$@"; time_limit=$2; shift ;;
    --job-name) need_value "$@"; job_name=$2; shift ;;
    --config) need_value "$@"; config=$2; shift ;;
    --override) need_value "$@"; check_override "$2"; config_flags+=" $(quote "--config.$2")"; shift ;;
    --workdir) need_value "$@"; workdir=$2; shift ;;
    --venv) need_value "$@"; venv=$2; shift ;;
    --port) need_value "$@"; port=$2; shift ;;
    --sbatch-option) need_value "$@"; sbatch_options+="#SBATCH $2"$'\n'; shift ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
  shift
done

[[ -n $workdir ]] || usage_error "--workdir is required"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes must be a positive integer, got '$nodes'"
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus-per-node must be a positive integer, got '$gpus_per_node'"
if ! [[ $port =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
  usage_error "--port must be 1..65535, got '$port'"
fi

# The job runs in this checkout, so paths given relative to here become absolute.
absolute() {
  if [[ $1 == /* ]]; then echo "$1"; else echo "$PWD/${1#./}"; fi
}
venv=$(absolute "$venv")
[[ $workdir == *://* ]] || workdir=$(absolute "$workdir")

train="$(quote "$venv/bin/python") -m ddnn_jax.main --config $(quote "$config") --workdir $(quote "$workdir")$config_flags"
task="export JAX_NUM_PROCESSES=\$SLURM_NNODES JAX_PROCESS_ID=\$SLURM_NODEID && exec $train"

job_script() {
  cat <<EOF
#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --time=$time_limit
EOF
  if [[ -n $partition ]]; then echo "#SBATCH --partition=$partition"; fi
  printf '%s' "$sbatch_options"
  cat <<EOF
set -euo pipefail
cd $(quote "$ROOT")
# ddnn_jax.main joins the processes through JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID. The coordinator runs on the first node
# (sed, not head, reads all of scontrol's output: no SIGPIPE under pipefail).
first_node=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | sed -n 1p)
export JAX_COORDINATOR_ADDRESS=\$first_node:$port
# One task per node, each expanding its own \$SLURM_NODEID (hence the single
# quotes); if one process fails, srun stops the others instead of letting them hang.
srun --kill-on-bad-exit=1 bash -c $(quote "$task")
EOF
}

if ((dry_run)); then
  echo "+ sbatch <<'EOF'"
  job_script
  echo "EOF"
  exit 0
fi

command -v sbatch >/dev/null || fail "sbatch not found on PATH: run this on a SLURM login node (or use --dry-run)"
[[ -x $venv/bin/python ]] || fail "no Python at $venv/bin/python: install the package with 'jax[cuda12]' (launch/README.md) or pass --venv"
job_script | sbatch
