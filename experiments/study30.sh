#!/usr/bin/env bash
# The 30-epoch CIFAR-10 study of docs/RESULTS.md (issue 15), resumable: run it
# again after any interruption, on this machine or a new one. It runs the
# driver from a git worktree pinned at PIN (later commits cannot change a run
# half-way), first restores the records of runs finished earlier
# (experiments/study_records.py), skips finished runs, resumes an unfinished
# one from its checkpoints, and saves finished runs' records into the repo
# (docs/results/study30/runs) after each step. Log: OUT/driver.log. Seed 2 of
# the headline runs is released into docs/models/study30 when it finishes;
# then a third seed of the best candidate, ekd_bn_private_all.
# After the headline seeds, two checks of seed 0 (ekd, the individual ResNet-20,
# ekd_bn_private_all, joint CE, the individual ResNet-8), each in its own OUT with its
# records in docs/results/<name>/runs: 100 epochs (study100: is the full net's
# under-fit a short-budget effect?), then the individual ResNet-14 at 100 epochs
# (so every depth has its individual net), and its seed 1 (the individual ResNet-8,
# ekd_bn_private_all, the individual ResNet-20 and ResNet-14, joint CE; each
# released into docs/models/study100 as it finishes), then width 1.0 at 30
# epochs (study30_w1, seed 0: is the full net's drag a capacity limit of the
# 8/16/32-channel net? the default EKD and the individual ResNet-20 first),
# then its seed 1 (the individual ResNet-8, the default EKD, the individual
# ResNet-20 and ResNet-14, joint CE), then the comparison methods' second
# seed (issue 12).
# Park the width-1.0 run the same way with --out /tmp/ddnn_study30_w1
# --parked docs/results/study30_w1/parked.
# Before a session ends, park the unfinished run so a new machine resumes it:
#   python experiments/study_records.py park --out /tmp/ddnn_study100 \
#       --parked docs/results/study100/parked   # then commit that folder
#
#   setsid nohup bash experiments/study30.sh >/dev/null 2>&1 &
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
PIN=${PIN:-a4c43a6}
OUT=${OUT:-/tmp/ddnn_study30}
ROOT=${ROOT:-$(cd "$REPO/.." && pwd)/shared/datasets/cifar10-jpeg-train.tar}
RECORDS=$REPO/docs/results/study30/runs
RELEASED=$REPO/docs/models/study30
OUT_W1=${OUT_W1:-/tmp/ddnn_study30_w1}
OUT_E100=${OUT_E100:-/tmp/ddnn_study100}
WIDTH=0.5
EPOCHS=30
WT=${WT:-/tmp/wt_study30_$PIN}
[ -d "$WT" ] || git -C "$REPO" worktree add --detach "$WT" "$PIN" || exit 1
mkdir -p "$OUT"
cd "$WT" || exit 1
records() { python experiments/study_records.py "$1" --out "$OUT" --records "$RECORDS"; }
parked() {  # parked park|unpark: unfinished runs' newest checkpoints, committed beside
  # RECORDS so a new machine resumes them (park runs from the main checkout)
  python "$REPO/experiments/study_records.py" "$1" --out "$OUT" --parked "${RECORDS%/runs}/parked"
}
drive() {  # drive ABLATIONS RUNS [DRIVER FLAGS...]; OUT, RECORDS, WIDTH, EPOCHS as set
  # --released: the main checkout's releases, a path that stays the same when
  # PIN moves (a comparison run's teacher path is one of its settings).
  nice -n 5 python experiments/cifar10_ekd.py --root "$ROOT" --out "$OUT" --epochs "$EPOCHS" \
    --width "$WIDTH" --seeds 3 --released "$RELEASED" \
    --ablations "$1" --only "$2" "${@:3}"
  local rc=$?
  records save
  parked park
  return $rc
}
each() {  # each ABLATIONS RUNS [DRIVER FLAGS...]: drive one run at a time, so
  # each finished run's records are saved at once
  local run
  for run in ${2//,/ }; do drive "$1" "$run" "${@:3}" || return; done
}
release() {  # release RUNS...: each finished run of OUT not yet released, into
  # RELEASED (DDNN runs with per-depth BN statistics), by the main checkout's
  # release: the pinned one cannot re-calibrate per-depth norm layers, and a
  # release only reads a finished run
  local run flags
  for run in "$@"; do
    [ -f "$RELEASED/$run/release.json" ] && continue
    flags=; case $run in ekd*|joint_ce*) flags="--recalibrate_bn 20";; esac
    (cd "$REPO" && nice -n 5 python -m ddnn_jax.release --workdir "$OUT/$run" \
      --out "$RELEASED/$run" $flags) || return
  done
}
check() {  # a seed-0 check; call with OUT, RECORDS, WIDTH and EPOCHS set for it
  mkdir -p "$OUT" && records restore && parked unpark &&
    each none ekd_s0,individual_d3_s0,individual_d1_s0 &&
    each ekd_bn_private_all ekd_bn_private_all_s0 &&
    each none joint_ce_s0
}
wide() {  # width 1.0, seed 0 (OUT, RECORDS, WIDTH, RELEASED set): the default
  # EKD and the individual ResNet-20 answer the question; the rest complete
  # the table; every run is released, as seed1 releases its runs
  mkdir -p "$OUT" && records restore && parked unpark &&
    each ekd_bn_private_all ekd_bn_private_all_s0 &&
    each none individual_d3_s0,individual_d1_s0,individual_d2_s0,joint_ce_s0 &&
    release ekd_bn_private_all_s0 individual_d3_s0 individual_d1_s0 individual_d2_s0 joint_ce_s0
}
seed1() {  # a check's second seed (OUT, RECORDS, WIDTH, EPOCHS, RELEASED set):
  # do the sub-net leads of EKD's default (per-depth BN) at seed 0 hold, and
  # its full net's gap (100 epochs: ResNet-8 and ResNet-14 ahead of the
  # individual nets and joint CE; width 1.0: its full net 1.24 below the
  # individual ResNet-20, its ResNet-8 only 0.24 above)? Every method of the
  # seed-0 table gets its seed 1, so each difference has a spread; each run is
  # released as it finishes.
  local run
  mkdir -p "$OUT" && records restore && parked unpark &&
    each none individual_d1_s1 && release individual_d1_s1 &&
    drive ekd_bn_private_all ekd_bn_private_all_s1 --ablation-seeds 2 &&
    release ekd_bn_private_all_s1 || return
  for run in individual_d3_s1 individual_d2_s1 joint_ce_s1; do
    each none "$run" && release "$run" || return
  done
}
{
  echo "=== start $(date -u) from $WT"
  records restore &&
  drive ekd_full_ce2 ekd_full_ce2_s0 &&
  drive none individual_d1_s1,individual_d2_s1,individual_d3_s1 &&
  drive none joint_ce_s1 &&
  drive ekd_head_full ekd_head_full_s0 &&
  drive ekd_bn_private_all ekd_bn_private_all_s0 &&
  each none depth_pruning_s0,offline_kd_d1_s0,offline_kd_d2_s0,one_s0,mcod_s0,indistill_d1_s0 \
    --comparison 1 &&
  drive ekd_bn_private_all ekd_bn_private_all_s1 --ablation-seeds 2 &&
  each none individual_d1_s2,individual_d2_s2,individual_d3_s2,joint_ce_s2,ekd_s2 &&
  release individual_d1_s2 individual_d2_s2 individual_d3_s2 joint_ce_s2 ekd_s2 &&
  drive ekd_bn_private_all ekd_bn_private_all_s2 --ablation-seeds 3 &&
  OUT=$OUT_E100 RECORDS=$REPO/docs/results/study100/runs EPOCHS=100 check &&
  OUT=$OUT_E100 RECORDS=$REPO/docs/results/study100/runs EPOCHS=100 each none individual_d2_s0 &&
  OUT=$OUT_E100 RECORDS=$REPO/docs/results/study100/runs EPOCHS=100 \
    RELEASED=$REPO/docs/models/study100 seed1 &&
  OUT=$OUT_W1 RECORDS=$REPO/docs/results/study30_w1/runs WIDTH=1.0 \
    RELEASED=$REPO/docs/models/study30_w1 wide &&
  OUT=$OUT_W1 RECORDS=$REPO/docs/results/study30_w1/runs WIDTH=1.0 \
    RELEASED=$REPO/docs/models/study30_w1 seed1 &&
  each none depth_pruning_s1,offline_kd_d1_s1,offline_kd_d2_s1,one_s1,mcod_s1,indistill_d1_s1 \
    --comparison 2
} >> "$OUT/driver.log" 2>&1
