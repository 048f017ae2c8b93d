#!/usr/bin/env bash
# The screening of docs/RESULTS.md, "Keeping the full net": the published ways
# to keep the full net's accuracy, each one EKD variant at the 30-epoch study's
# recipe (width 0.5, seed 0), in the study's OUT beside its baselines (the
# individual nets and joint CE, three seeds, not rerun), resumable like
# study30.sh: run it again after any interruption, on this machine or a new
# one. It runs from a git worktree pinned at PIN, restores the records of runs
# finished earlier, skips finished runs, resumes an unfinished one from its
# checkpoints (from docs/results/study30/parked on a fresh machine), and saves
# each finished run's records into docs/results/study30/runs.
#
# First the gradient check (one epoch of today's default: the cosine of the
# sub-nets' gradient with the full net's on the shared weights, per stage),
# written to docs/results/study41/; then the variants, cheapest first; then
# the comparison methods' second seed that study30.sh had left (MCOD, InDistill).
# The runs and the commit each runs from are listed in experiments/study41.queue.
#
#   setsid nohup bash experiments/study41.sh >/dev/null 2>&1 &
#
# Before a session ends, park the unfinished run so a new machine resumes it:
#   python experiments/study_records.py park --out /tmp/ddnn_study30 \
#       --parked docs/results/study30/parked   # then commit that folder
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PIN=${PIN:-110ae67}
OUT=${OUT:-/tmp/ddnn_study30}
ROOT=${ROOT:-$(cd "$REPO/.." && pwd)/shared/datasets/cifar10-jpeg-train.tar}
RECORDS=$REPO/docs/results/study30/runs
CHECKS=$REPO/docs/results/study41
QUEUE=${QUEUE:-$REPO/experiments/study41.queue}
WT=${WT:-/tmp/wt_study41_$PIN}
[ -d "$WT" ] || git -C "$REPO" worktree add --detach "$WT" "$PIN" || exit 1
mkdir -p "$OUT" "$CHECKS"
cd "$WT" || exit 1
records() { python experiments/study_records.py "$1" --out "$OUT" --records "$RECORDS"; }
parked() { python "$REPO/experiments/study_records.py" "$1" --out "$OUT" --parked "${RECORDS%/runs}/parked"; }
drive() {  # drive ABLATION RUN [DRIVER FLAGS...]
  nice -n 5 python experiments/cifar10_ekd.py --root "$ROOT" --out "$OUT" --epochs 30 \
    --width 0.5 --seeds 3 --released "$REPO/docs/models/study30" \
    --ablations "$1" --only "$2" "${@:3}"
  local rc=$?
  records save
  parked park
  return $rc
}
gradient_check() {  # one epoch (351 steps) of the default EKD, every 10th step
  [ -s "$CHECKS/grad_cosine.txt" ] && return 0
  nice -n 5 python experiments/ekd_gradients.py --root "$ROOT" --out "$OUT/grad_cosine.jsonl" \
    --steps 351 --every 10 --window 117 > "$OUT/grad_cosine.txt" &&
    cp "$OUT/grad_cosine.jsonl" "$OUT/grad_cosine.txt" "$CHECKS/"
}
{
  echo "=== start $(date -u) from $WT"
  records restore && parked unpark && gradient_check || exit 1
  # The queue is re-read after every run, so candidates appended to it while
  # this driver runs are screened in turn; a line whose PIN differs from the
  # driver's runs from its own pinned worktree.
  i=0
  while line=$(grep -v -e '^#' -e '^[[:space:]]*$' "$QUEUE" | sed -n "$((i + 1))p"); [ -n "$line" ]; do
    set -- $line
    pin=$3
    WT=/tmp/wt_study41_$pin
    [ -d "$WT" ] || git -C "$REPO" worktree add --detach "$WT" "$pin" || exit 1
    cd "$WT" || exit 1
    echo "=== $(date -u) $2 (ablation $1) at $pin"
    drive "$1" "$2" "${@:4}" || exit 1
    i=$((i + 1))
  done
} >> "$OUT/driver.log" 2>&1
