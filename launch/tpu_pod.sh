#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: creates the TPU VM, copies the code to every
# worker, installs it, runs python -m ddnn_jax.main on all workers at once, and
# optionally deletes the VM. See --help and launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

# The project needs Python 3.11 (jax 0.10 does); the TPU VM images ship 3.10, so
# the workers' venv gets a 3.11 that uv downloads.
PYTHON_VERSION=3.11

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --tpu NAME --workdir gs://BUCKET/DIR [options]

Creates a Cloud TPU VM slice, copies the code to every worker, installs it with
jax[tpu], and runs python -m ddnn_jax.main on all workers at once.

  --tpu NAME               TPU VM name (required)
  --workdir gs://...       checkpoints and logs (required); must be on GCS,
                           the workers of a pod share no disk
  --zone ZONE              default us-central2-b
  --project PROJECT        default: gcloud's configured project
  --accelerator-type TYPE  default v4-32
  --version VERSION        TPU VM runtime, default tpu-ubuntu2204-base
  --config FILE[:ARG]      default configs/imagenet.py (e.g. configs/imagenet.py:smoke)
  --override KEY=VALUE     passed on as --config.KEY=VALUE; repeatable
  --repo URL|PATH          the code: a git URL the workers clone, or a local git
                           checkout; default this checkout. A checkout is copied as
                           its tracked and new (not ignored) files.
  --spot, --preemptible    create a Spot TPU VM
  --skip-create            the TPU VM exists already
  --delete-after           delete the TPU VM at the end, also when a step fails
  --aot-check              before anything is created, compile the train and eval
                           programs for --accelerator-type here, with libtpu
                           (python -m ddnn_jax.aot, needs pip install -e '.[tpu]');
                           stop if one does not fit in a chip's HBM
  --preflight CMD          a local check run first, in this checkout; if it fails,
                           nothing is created
  --dry-run                print every command, one per line after '+ ', and run
                           none of them (except --preflight, which is local)
  -h, --help               this help

Example:
  launch/tpu_pod.sh --tpu ddnn-v4 --workdir gs://my-bucket/r50_ekd --dry-run
EOF
}

tpu='' zone=us-central2-b project='' accelerator_type=v4-32
version=tpu-ubuntu2204-base config=configs/imagenet.py workdir='' repo=''
preflight='' aot_check=0 spot=0 skip_create=0 delete_after=0 dry_run=0
config_flags=''  # ' --config.KEY=VALUE' per --override, quoted for the workers' shell

while (($#)); do
  case $1 in
    --tpu) need_value "$@"; tpu=$2; shift ;;
    --zone) need_value "$@"; zone=$2; shift ;;
    --project) need_value "$@"; project=$2; shift ;;
    --accelerator-type) need_value "$@"; accelerator_type=$2; shift ;;
    --version) need_value "$@"; version=$2; shift ;;
    --config) need_value "$@"; config=$2; shift ;;
    --override) need_value "$@"; check_override "$2"; config_flags+=" $(quote "--config.$2")"; shift ;;
    --workdir) need_value "$@"; workdir=$2; shift ;;
    --repo) need_value "$@"; repo=$2; shift ;;
    --preflight) need_value "$@"; preflight=$2; shift ;;
    --aot-check) aot_check=1 ;;
    --spot | --preemptible) spot=1 ;;
    --skip-create) skip_create=1 ;;
    --delete-after) delete_after=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
  shift
done

[[ -n $tpu ]] || usage_error "--tpu NAME is required"
[[ -n $workdir ]] || usage_error "--workdir is required"
[[ $workdir == gs://* ]] || usage_error "--workdir must be a gs:// path: the workers of a TPU pod share no local disk"

# The code: cloned from a git URL on the workers, or packed from a local checkout.
source_dir=''
if [[ -z $repo ]]; then
  source_dir=$ROOT
elif [[ $repo == *://* || $repo =~ ^[^/]+@[^/]+: ]]; then
  : # a git URL (https://..., ssh://..., git@host:owner/name.git)
elif [[ -d $repo ]]; then
  source_dir=$(cd "$repo" && pwd)
else
  usage_error "--repo '$repo' is neither a git URL nor a directory"
fi
if [[ -n $source_dir ]] && ! git -C "$source_dir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  usage_error "--repo '$source_dir' is not a git checkout"
fi

# jax[tpu] at the project's own jax pin (from a git URL: this checkout's pin).
pin_file=${source_dir:-$ROOT}/setup.cfg
jax_version=$(sed -n 's/^[[:space:]]*jax==\([^[:space:]]*\).*/\1/p' "$pin_file" 2>/dev/null || true)
[[ -n $jax_version ]] || fail "no 'jax==VERSION' pin in $pin_file"

# show LINE: a command about to run, after '+ '; on stdout in a dry run (where it
# is the output), else on stderr.
show() {
  if ((dry_run)); then echo "+ $1"; else echo "+ $1" >&2; fi
}

# run CMD...: shows the command and runs it, unless this is a dry run.
run() {
  show "$(quote "$@")"
  ((dry_run)) || "$@"
}

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -z $project ]] || where+=(--project "$project")

# ssh_all COMMAND: runs a shell command on every worker of the slice at once.
ssh_all() {
  run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command "$1"
}

# pack_checkout DIR TARBALL: the files git would commit (tracked, or new and not
# ignored) as a tarball. Tracked files deleted from the work tree are left out.
pack_checkout() {
  local dir=$1 tarball=$2 file list pack
  list="git -C $(quote "$dir") ls-files -z --cached --others --exclude-standard"
  pack="tar -czf $(quote "$tarball") -C $(quote "$dir") --null -T -"
  show "$list | $pack"
  ((!dry_run)) || return 0
  git -C "$dir" ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' file; do
        if [[ -e $dir/$file ]]; then printf '%s\0' "$file"; fi
      done \
    | tar -czf "$tarball" -C "$dir" --null -T -
}

if ((!dry_run)); then
  command -v gcloud >/dev/null || fail "gcloud not found on PATH: install the Google Cloud CLI (or use --dry-run)"
fi

# Preflight: local checks before anything is created (or paid for). Their output
# goes to stderr so that a dry run prints commands only.
if ((aot_check)); then
  aot="python -m ddnn_jax.aot --config $(quote "$config") --topology $(quote "$accelerator_type")$config_flags"
  preflight="$aot${preflight:+ && $preflight}"
fi
if [[ -n $preflight ]]; then
  show "$preflight"
  (cd "$ROOT" && bash -c "$preflight") >&2 \
    || fail "preflight check failed (exit $?): $preflight; nothing was created"
fi

tmp_dir=''
on_exit() {
  local status=$?
  if [[ -n $tmp_dir ]]; then rm -rf "$tmp_dir"; fi
  if ((delete_after)); then run "${tpu_vm[@]}" delete "$tpu" "${where[@]}" --quiet; fi
  exit "$status"
}

# (a) Create the slice; from then on the exit handler deletes it if asked to.
if ((!skip_create)); then
  create=("${tpu_vm[@]}" create "$tpu" "${where[@]}" --accelerator-type "$accelerator_type" --version "$version")
  if ((spot)); then create+=(--spot); fi
  run "${create[@]}"
fi
trap on_exit EXIT

# (b) Copy the code to ~/ddnn_jax on every worker, replacing what was there.
if [[ -z $source_dir ]]; then
  ssh_all "rm -rf ddnn_jax && git clone --depth 1 $(quote "$repo") ddnn_jax"
else
  if ((dry_run)); then
    tarball=${TMPDIR:-/tmp}/ddnn_jax.XXXXXXXXXX/ddnn_jax.tar.gz  # as mktemp names it
  else
    tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/ddnn_jax.XXXXXXXXXX")
    tarball=$tmp_dir/ddnn_jax.tar.gz
  fi
  pack_checkout "$source_dir" "$tarball"
  run "${tpu_vm[@]}" scp "$tarball" "$tpu:ddnn_jax.tar.gz" "${where[@]}" --worker=all
  ssh_all "rm -rf ddnn_jax && mkdir ddnn_jax && tar -xzf ddnn_jax.tar.gz -C ddnn_jax && rm ddnn_jax.tar.gz"
fi

# (c) Install into ~/venv on every worker; the venv is kept between launches.
make_venv="python3 -m pip install --user --quiet uv && ~/.local/bin/uv venv --seed --allow-existing --python $PYTHON_VERSION ~/venv"
ssh_all "cd ddnn_jax && $make_venv && ~/venv/bin/pip install -U pip && ~/venv/bin/pip install -e . $(quote "jax[tpu]==$jax_version")"

# (d) Train: one process per worker; JAX finds the other workers by itself.
ssh_all "cd ddnn_jax && ~/venv/bin/python -m ddnn_jax.main --config $(quote "$config") --workdir $(quote "$workdir")$config_flags"

# (e) --delete-after: done by on_exit.
