#!/usr/bin/env bash
# Two gpu2-scale probes of the transfer study's scratch pixels arm on one GPU, side by side, on the same generated
# CLEVR set (IMAGES images): images at 30x20 and at 40x27 pixels, both with a loss weight of 0.1 on the image bytes.
#   bash results/probe_pair.sh OUTDIR          (from the repository root; .data/pg19-mini present)
# B_NAME / B_SET change the second probe: B_SET is its overrides on top of the first's, space-separated, e.g. the
# question before the image at 30x20:
#   B_NAME=qiqa_30x20 B_SET='serializer.order=[question,image,question,answer]' bash results/probe_pair.sh OUTDIR
# A_NAME / A_SET do the same for the first probe (default w01_30x20, no overrides), e.g. both question-first:
#   A_NAME=qiqa_30x20 A_SET='serializer.order=[question,image,question,answer]' B_NAME=qiqa_w384 \
#   B_SET='serializer.order=[question,image,question,answer] model.stages.0.width=384' bash results/probe_pair.sh OUTDIR
# OUTDIR/probes.tgz: each probe's summary, prior, run metrics and eval records (no checkpoints, data, per-token h5
# files or answer rows: at 12,000 images those made it 24 MB, too large to come back from the device).
set -u
out=${1:?OUTDIR}
mkdir -p "$out"
a=${A_NAME:-w01_30x20}
b=${B_NAME:-w01_40x27}
aset=()
read -ra aparts <<< "${A_SET:-}"  # no globbing
for x in "${aparts[@]}"; do aset+=(--clevr-set "$x"); done
common=(--scale "${SCALE:-gpu2}" --arms scratch --seeds 1 --kinds pixels --no-cnn --only pixels_scratch_s0
        --images "${IMAGES:-6000}" --pg19 .data/pg19-mini
        --clevr-set serializer.loss=weights --clevr-set serializer.weights.image=0.1)
python3 results/run_transfer.py "${common[@]}" --out "$out/$a" --budget "${BUDGET:-540}" ${STEPS30:+--clevr-set train.steps=$STEPS30} "${aset[@]}" > "$out/$a.log" 2>&1 &
apid=$!
( # the second probe reuses the first one's data once its prior (computed after the data) is written; if the
  # first probe ends without it (its data step failed), the second does not start (it waited until the call's
  # time limit once: twelfth session)
  while [ ! -f "$out/$a/prior.json" ]; do
    if ! kill -0 "$apid" 2>/dev/null && [ ! -f "$out/$a/prior.json" ]; then
      echo "probe $b: not started: the first probe ($a) ended without its data (see $out/$a.log)" | tee "$out/$b.log" >&2
      exit 1
    fi
    sleep 2
  done
  bset=()
  read -ra bparts <<< "${B_SET:-serializer.image.size=[40,27] data.seq_len=4096 model.stages.0.length=512}"  # no globbing
  for x in "${bparts[@]}"; do bset+=(--clevr-set "$x"); done
  mkdir -p "$out/$b" && ln -sfn "$out/$a/data" "$out/$b/data"
  python3 results/run_transfer.py "${common[@]}" --out "$out/$b" --budget "${BUDGET40:-500}" ${STEPS40:+--clevr-set train.steps=$STEPS40} \
    "${bset[@]}" > "$out/$b.log" 2>&1 ) &
wait
(cd "$out" && tar czf probes.tgz --exclude=data --exclude=checkpoints --exclude=templates --exclude='*.h5' --exclude=answer_rows \
  --exclude=transfer_metrics.tar.gz "$a" "$b" ./*.log)
tail -n 5 "$out"/*.log
