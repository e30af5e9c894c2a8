#!/usr/bin/env bash
# The GPU jobs behind benchmarks/RESULTS.md (model section). From the repository root, on a machine with
# one H100 / H200, with the wheels of ../shared/wheels/gpu-py312 copied to .whl/:
#   bash benchmarks/run_gpu.sh STEP OUTDIR
# STEP: tests | train | generate | gen_table | context | vqa | first | small | small_ctx | pg19 | clevr | clevr_tests | issue17 | spec_static | spec_run | spec360 | gen64 | gen_ssm | verify_pass | triage | probe | speedrun (each fits in one 10-minute device command; a fresh machine
# spends ~2 minutes on Triton JIT + autotuning of mamba-ssm's kernels in its first process).
set -uo pipefail
step=${1:?step: tests|train|generate|gen_table|context|vqa|first|small|small_ctx|pg19|clevr|clevr_tests|issue17|spec_static|spec_run|spec360|gen64|gen_ssm|verify_pass|triage|probe|speedrun}
out=${2:-/tmp/omnibyte_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# cache mamba-ssm's Triton autotuning results on disk so later processes on the machine skip it
export TRITON_CACHE_AUTOTUNING=1
# compile caches from one session's machine to the next (a fresh machine's first process spends ~2 minutes on
# Triton JIT, autotuning and inductor compiles): DEVCACHE_SAVE=1 packs the inductor and Triton caches into
# $out/devcache.tgz after the step (15 MiB parts, devcache.tgz.part-NN, when larger; the size goes to env.txt);
# DEVCACHE=path/to/devcache.tgz (a carried copy, parts beside it) unpacks them before the step. The caches check
# the torch / Triton versions and the GPU themselves: a stale entry is recompiled, never used
top=0
if [ -z "${RUN_GPU_NESTED:-}" ]; then
  top=1
  export RUN_GPU_NESTED=1  # the steps that run this script again (triage, spec_pair) share the top one's caches
  if [ -n "${DEVCACHE:-}" ] || [ "${DEVCACHE_SAVE:-0}" = 1 ]; then
    export TORCHINDUCTOR_CACHE_DIR=/tmp/devcache/inductor TRITON_CACHE_DIR=/tmp/devcache/triton
    mkdir -p /tmp/devcache
    if [ -n "${DEVCACHE:-}" ]; then
      cat "$DEVCACHE"* | tar xz -C /tmp/devcache || echo "DEVCACHE=$DEVCACHE: not unpacked; compiling afresh" >&2
    fi
  fi
fi
if [ "${RUN_GPU_SETUP:-1}" = 1 ]; then  # RUN_GPU_SETUP=0: a CPU dry run of a step in an installed venv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
# the device copy is not pip-installed: map omnibyte.{tasks,serializers,configs} to the top-level folders as the
# editable install and the wheel do
for p in tasks serializers configs; do ln -sfn "../$p" "omnibyte/$p"; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/env.txt"
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/env.txt"
# --- issue 17's runs (also combined in the issue17 step) -------------------------------------------
# pg19_lm (the target) and a 4-layer drafter trained side by side on PG19-mini (PG19_ROOT; default
# .data/pg19-mini, carried); then the target's robustness table on the validation book, and plain vs speculative
# greedy decoding (prompt: the validation book) timed in one job
pg19_root=${PG19_ROOT:-.data/pg19-mini}; pg19_runs=/tmp/omnibyte_pg19_runs
clevr_runs=/tmp/omnibyte_clevr_runs
gpu_tests() {
  # SIGINT at the time limit: pytest stops and still prints the failures so far (SIGTERM would lose them)
  MAMBA_DETERMINISTIC=1 timeout -s INT -k 30 "${TESTS_TIMEOUT:-540}" python3 -m pytest -q -s --tb=short \
    -p no:cacheprovider -m gpu ${TESTS_PATHS:-tests/} -rs > "$out/gpu_tests.log" 2>&1
  tail -n 40 "$out/gpu_tests.log"
}
pg19_train() {
  local steps=${PG19_STEPS:-1000}
  local common=(task.root="$pg19_root" out_dir="$pg19_runs" train.steps="$steps" train.eval_every="$steps"
                train.ckpt_every="${CKPT_EVERY:-$steps}" train.warmup=100 ${PG19_OVERRIDES:-train.compile=true})
  timeout -k 60 "${TRAIN_TIMEOUT:-330}" python3 -m omnibyte train pg19_lm "${common[@]}" --quiet > "$out/pg19_lm.log" 2>&1 &
  timeout -k 60 "${TRAIN_TIMEOUT:-330}" python3 -m omnibyte train pg19_lm run_name=pg19_small "${common[@]}" \
    model.stages.0.width=256 model.stages.0.layers=2 model.stages.1.width=128 model.stages.1.layers=2 \
    model.stages.1.block.heads=2 --quiet > "$out/pg19_small.log" 2>&1 &
  wait
  tail -n 3 "$out/pg19_lm.log" "$out/pg19_small.log"
  cp "$pg19_runs/pg19_lm/metrics.jsonl" "$out/pg19_lm_metrics.jsonl"
}
pg19_robustness() {
  timeout 150 python3 -m omnibyte robustness "$pg19_runs/pg19_lm" --out "$out/robustness_pg19.json" --quiet \
    2>&1 | tee "$out/robustness_pg19.txt"
}
pg19_speculative() {  # a timing: run it alone on the GPU
  timeout 200 python3 benchmarks/generate.py --speculative --run "$pg19_runs/pg19_lm" --draft "$pg19_runs/pg19_small" \
    --draft-len ${DRAFT_LEN:-8} --prompt-file "$pg19_root/validation/11.txt" --contexts 1024 --new 512 \
    ${SPEC_FLAGS:---graph} --out "$out/bench.jsonl" 2>&1 | tail -c 4000 | tee "$out/spec.log"
}
# clevr_vqa_png (the shipped 15.8M model) on a generated CLEVR-format set, then `omnibyte robustness` on
# CLEVR_LIMIT val questions (text, image-byte and image-file corruptions)
clevr_train() {
  local steps=${CLEVR_STEPS:-1500}
  timeout -k 60 "${TRAIN_TIMEOUT:-420}" python3 -m omnibyte train clevr_vqa_png out_dir="$clevr_runs" train.steps="$steps" \
    train.eval_every="$steps" train.ckpt_every="${CKPT_EVERY:-$steps}" task.synth.images="${CLEVR_IMAGES:-2000}" \
    ${CLEVR_OVERRIDES:-} --quiet > "$out/clevr_vqa_png.log" 2>&1
  tail -n 30 "$out/clevr_vqa_png.log"
  cp "$clevr_runs"/clevr_vqa_png*/metrics.jsonl "$out/clevr_metrics.jsonl"
}
clevr_robustness() {
  timeout 150 python3 -m omnibyte robustness "$clevr_runs"/clevr_vqa_png* --limit "${CLEVR_LIMIT:-300}" \
    --out "$out/robustness_clevr.json" --quiet 2>&1 | tee "$out/robustness_clevr.txt"
}
# trainable context of the 3-stage family: one step per size, doubling from CTX_START_MIB
context() {
  timeout "${CTX_TIMEOUT:-540}" python3 benchmarks/max_context.py --start-mib "${CTX_START_MIB:-8}" \
    --max-mib "${CTX_MAX_MIB:-1024}" --time-cap "${CTX_TIME_CAP:-420}" --step-cap "${CTX_STEP_CAP:-150}" \
    ${CTX_AC:+--activation-checkpointing} \
    --out "$out/bench.jsonl" 2>&1 | tail -c 4000 | tee "$out/ctx.log"
}
small() {  # the shipped 15.8M model (pg19_lm, also CLEVR's): omnibyte (compiled + graphs, eager) and mblm 0.4.2
  timeout "${SMALL_TIMEOUT:-540}" python3 benchmarks/train_throughput.py --preset pg19_lm --impl inproc --batch 16 \
    --length 8192 --order omnibyte+compile+graphs,mblm,omnibyte --steps 20 --warmup 3 \
    --out "$out/bench.jsonl" 2>&1 | tail -c 6000 | tee "$out/small.log"
}
spec_pair() {  # the speculative timing on run $1 in each of SPEC_MODES (default "aligned plain": patch-aligned passes,
  # then not; the spec_run step each), SPEC_TIMEOUT seconds each (SPEC_TIMEOUT_ALIGNED for the aligned one)
  local mode extra
  for mode in ${SPEC_MODES:-aligned plain}; do
    case "$mode" in aligned) extra=--aligned ;; plain) extra="" ;; *) echo "SPEC_MODES: unknown mode $mode" >&2; return 1 ;; esac
    local t=${SPEC_TIMEOUT:-150}
    [ "$mode" = aligned ] && t=${SPEC_TIMEOUT_ALIGNED:-$t}
    SPEC_RUN=$1 SPEC_FLAGS_EXTRA=$extra SPEC_TIMEOUT=$t bash "$0" spec_run "$out/spec${extra#--}"
  done
}
# the device returns at most 8 files: at the end, everything but bench.jsonl and env.txt goes into logs.tgz
pack() {
  local rest
  rest=$(cd "$out" && find . -type f ! -name bench.jsonl ! -name env.txt ! -name logs.tgz ! -name 'devcache.tgz*' | sort)
  if [ -n "$rest" ]; then
    (cd "$out" && tar czf logs.tgz $rest && rm -f $rest)
  fi
  if [ "$top" = 1 ] && [ "${DEVCACHE_SAVE:-0}" = 1 ] && [ -d /tmp/devcache ]; then
    tar czf /tmp/devcache.tgz -C /tmp/devcache .
    local size
    size=$(stat -c %s /tmp/devcache.tgz)
    echo "devcache.tgz: $size bytes" | tee -a "$out/env.txt"
    if [ "$size" -le $((15 * 1024 * 1024)) ]; then
      cp /tmp/devcache.tgz "$out/"
    else
      split -b 15M -d /tmp/devcache.tgz "$out/devcache.tgz.part-"
    fi
  fi
}
trap pack EXIT

case "$step" in
  tests)    gpu_tests ;;
  # omnibyte (compiled + CUDA graphs, compiled, eager) and mblm 0.4.2 in one process
  train)    timeout 540 python3 benchmarks/train_throughput.py --preset mblm360m --impl inproc \
              --order omnibyte+compile+graphs,mblm,omnibyte+compile,omnibyte --profile 25 --steps 20 --warmup 3 \
              --out "$out/bench.jsonl" 2>&1 | tail -c 8000 | tee "$out/train.log" ;;
  generate) timeout 540 python3 benchmarks/generate.py --graph --compile --profile 20 --mblm \
              --out "$out/bench.jsonl" 2>&1 | tail -c 6000 | tee "$out/gen.log" ;;
  context)  context ;;
  # issue 17 item 3's table: the 360M decoder at batch 1, 4, 16, 64 (per-sequence and total bytes/s), 1 KiB context
  gen_table) timeout 540 python3 benchmarks/generate.py --graph --compile --batches 1,4,16,64 --contexts 1024 \
              --out "$out/bench.jsonl" 2>&1 | tail -c 4000 | tee "$out/gen_table.log" ;;
  # VQA rank-mode scoring, 16M clevr_vqa_png model, 500 val questions: per-question loop vs score_batch
  vqa)      timeout 540 python3 benchmarks/vqa_eval.py --questions 500 --workers 8 \
              --out "$out/bench.jsonl" 2>&1 | tail -c 4000 | tee "$out/vqa.log" ;;
  # shape-stable batches: steps in the first 3 minutes of a CLEVR pixels run, pad_to longest vs buckets (cold
  # Triton cache per arm; the data are generated first, untimed)
  # FIRST_PRIME=S: each arm first runs S seconds untimed in its own cache folders (a user's second run)
  first)    timeout 590 python3 benchmarks/first_minutes.py --config clevr_vqa_pixels --seconds 180 --logs "$out" \
              --arms "${FIRST_ARMS:-longest,buckets}" --prime "${FIRST_PRIME:-0}" ${FIRST_PRIME_ONCE:+--prime-once} task.synth.images=600 \
              --out "$out/bench.jsonl" 2>&1 | tail -c 4000 | tee "$out/first.log" ;;
  small)    small ;;
  # issue 18 items 2 and 5 in one call: the pg19_lm throughput, then 64 -> 256 MiB of context (one step each)
  small_ctx) SMALL_TIMEOUT=300 small
            CTX_START_MIB=64 CTX_MAX_MIB=256 CTX_STEP_CAP=240 CTX_TIME_CAP=400 CTX_TIMEOUT=280 context ;;
  pg19)     pg19_train; pg19_robustness; pg19_speculative ;;
  clevr)    clevr_train; clevr_robustness ;;
  # issue 17 in one call: the GPU tests and both trainings side by side (none of them a timing), then the two
  # robustness tables, then the speculative timing alone (PG19_STEPS / CLEVR_STEPS / TESTS_TIMEOUT to fit)
  issue17)  gpu_tests & pg19_train & clevr_train & wait
            clevr_robustness; pg19_robustness; pg19_speculative ;;
  # the rest of issue 17's first call: the CLEVR run and its robustness table, beside the GPU tests
  clevr_tests) gpu_tests & clevr_train & wait
            clevr_robustness ;;
  # issue 17 item 2 on the static passes, in one call: a 3-minute pg19_lm speedrun arm (also the target), the
  # speculative timing with patch-aligned passes and without (segments through the decode kernels, the default on
  # CUDA), each profiled, then the GPU tests of graph_verify and the Mamba-2 kernels in the time left
  spec_static)
            timeout -k 20 420 python3 benchmarks/speedrun.py --root "$pg19_root" --minutes "${SR_MINUTES:-3}" \
              --work /tmp/sr --out "$out/sweep.jsonl" --common train.compile=true train.cuda_graphs=true \
              --arm base: --only base > "$out/sweep.log" 2>&1; tail -c 1500 "$out/sweep.log"
            spec_pair /tmp/sr/runs/base
            TESTS_PATHS="tests/test_graph_verify.py tests/test_ssm_kernels.py" TESTS_TIMEOUT=${TESTS_TIMEOUT:-150} gpu_tests ;;
  # issue 17 item 2 on an existing PG19 run (SPEC_RUN, default the 10-minute speedrun arm drop01 in /tmp/sr): the
  # speculative timing with the compiled static pass (VERIFY_COMPILE=0: uncompiled; SPEC_FLAGS_EXTRA=--aligned:
  # patch-aligned passes), one profiled call
  spec_run) timeout "${SPEC_TIMEOUT:-200}" python3 benchmarks/generate.py --speculative --run "${SPEC_RUN:-/tmp/sr/runs/drop01}" \
              --draft lookup --draft-len ${DRAFT_LEN:-8} --graph --compile --graph-verify \
              --verify-compile "${VERIFY_COMPILE:-1}" --eager-repeat 1 --profile 15 --prompt-file "$pg19_root/validation/11.txt" \
              --contexts 1024 --new 512 ${SPEC_FLAGS_EXTRA:-} --out "$out/bench.jsonl" > "$out/spec.log" 2>&1
            tail -c 2500 "$out/spec.log" ;;
  # issue 17 item 2 where weight reads are the cost: a 360M-shaped model (benchmarks' mblm360m: Mamba-2 1024 x 25,
  # Transformer 1024 x 21) trained T360_MIN minutes on PG19-mini, then the speculative timings on it, patch-aligned
  # and not (each SPEC_TIMEOUT)
  spec360)  run360=/tmp/omnibyte_360/pg19_360m
            if [ ! -f "$run360/config.yaml" ] || [ "${T360_AGAIN:-0}" = 1 ]; then
              timeout -k 30 "${T360_TIMEOUT:-330}" python3 -m omnibyte train pg19_lm task.root="$pg19_root" \
                out_dir=/tmp/omnibyte_360 run_name=pg19_360m model.stages.0.width=1024 model.stages.0.layers=25 \
                model.stages.1.width=1024 model.stages.1.layers=21 model.stages.1.block.heads=16 \
                model.stages.1.block.head_dim=64 model.stages.1.block.mlp_hidden=1344 data.batch_size=6 \
                train.steps=3000 train.warmup=100 train.lr=3e-4 train.stop_after_minutes="${T360_MIN:-4}" \
                train.eval_every=0 train.ckpt_every=0 train.compile=true train.cuda_graphs=true --quiet \
                > "$out/train360.log" 2>&1
              tail -n 5 "$out/train360.log"
            fi
            spec_pair "$run360" ;;
  # issue 17 item 3: the Mamba-2 decode kernels (ssm_kernels) against the compiled torch step for the global stage,
  # 360M config, batch 1 (then batch 4) at 1 KiB and 1 MiB, one process each, back to back; their GPU tests first
  gen_ssm)  TESTS_PATHS=tests/test_ssm_kernels.py TESTS_TIMEOUT=120 gpu_tests
            for sk in 1 0; do
              timeout "${GEN_SSM_TIMEOUT:-150}" python3 benchmarks/generate.py --graph --compile --ssm-kernels "$sk" \
                --batches "${GEN_SSM_BATCHES:-1,4}" --contexts 1024,1048576 --new 256 --out "$out/bench.jsonl" \
                > "$out/gen_ssm$sk.log" 2>&1
              tail -c 1500 "$out/gen_ssm$sk.log"
            done ;;
  # issue 17 item 3: the batch-64 row of the table (GEN_BATCHES: e.g. 4,16,64 to find where the torch step, whose
  # linears are matrix products over several rows since c8ba61c, overtakes the kernels), the decode kernels in row
  # chunks (--kernels 1) and the compiled torch step (--kernels 0), each in its own process (GEN64_TIMEOUT each)
  gen64)    for k in ${GEN64_KERNELS:-1 0}; do
              timeout "${GEN64_TIMEOUT:-130}" python3 benchmarks/generate.py --graph --compile --batches "${GEN_BATCHES:-64}" \
                --contexts 1024 --new 128 --kernels "$k" --out "$out/bench.jsonl" > "$out/gen64_k$k.log" 2>&1
              tail -c 1500 "$out/gen64_k$k.log"
            done ;;
  # issue 17 item 2: one static verification round against one plain step on the 360M shape (random weights), the
  # passes' segments through the torch ops and through the decode kernels (VP_T: pass lengths)
  verify_pass) timeout "${VP_TIMEOUT:-300}" python3 benchmarks/verify_pass.py --preset mblm360m --T "${VP_T:-5,9}" \
              --segments "${VP_SEGMENTS:-torch,kernels}" --out "$out/bench.jsonl" > "$out/verify_pass.log" 2>&1
            tail -c 2500 "$out/verify_pass.log" ;;
  # the eleventh session's open GPU questions in one call: verify_pass (torch vs kernel segments), then the GPU tests
  # of CUDA graphs under DDP, of the Mamba-2 decode kernels (per graphs / PDL combination) and of the static passes
  triage)   VP_TIMEOUT=${VP_TIMEOUT:-270} VP_T=${VP_T:-5,9} bash "$0" verify_pass "$out/vp"
            # the two-process DDP test last: its torchrun launches each pay Triton's JIT (it did not finish in 230 s)
            TESTS_PATHS="tests/test_ssm_kernels.py tests/test_graph_verify.py
              tests/test_gpu_fast_paths.py::test_gpu_ddp_cuda_graphs_follow_the_ddp_eager_curve" \
              TESTS_TIMEOUT=${TESTS_TIMEOUT:-270} gpu_tests ;;
  # issue 16 item 4: two gpu2-scale probes of the scratch pixels arm side by side (results/probe_pair.sh; its
  # A_/B_ variables pass through), in /tmp/probes (its folders are deeper than the device returns), then
  # probes.tgz into $out
  probe)    timeout -k 20 "${PROBE_TIMEOUT:-560}" bash results/probe_pair.sh /tmp/probes
            cp /tmp/probes/probes.tgz "$out/" ;;
  # issue 18 item 4: speedrun arms (SR_ARMS: NAME:override,... space-separated; SR_ONLY picks; SR_MINUTES;
  # SR_FINAL=1: the test book, its looks recorded in benchmarks/speedrun_looks.jsonl, SR_LOOK_AGAIN=1 after one);
  # --call-seconds pauses a long arm with a checkpoint: run the same step again on the warm machine to go on
  speedrun) arms=(); for x in ${SR_ARMS:-base: drop:model.dropout=0.1}; do arms+=(--arm "$x"); done
            timeout -k 20 590 python3 benchmarks/speedrun.py --root "$pg19_root" --minutes "${SR_MINUTES:-3}" \
              --work /tmp/sr --out "$out/sweep.jsonl" --common train.compile=true train.cuda_graphs=true \
              "${arms[@]}" ${SR_ONLY:+--only $SR_ONLY} --call-seconds "${SR_CALL_SECONDS:-560}" \
              --eval-points "${SR_EVAL_POINTS:-0}" \
              ${SR_FINAL:+--final-test --choose-from "$out/sweep.jsonl" --looks benchmarks/speedrun_looks.jsonl} \
              ${SR_LOOK_AGAIN:+--look-again} > "$out/sweep.log" 2>&1
            # the sweep's test-book looks (kept in the repository: copy this file back over benchmarks/)
            [ -n "${SR_FINAL:-}" ] && cp benchmarks/speedrun_looks.jsonl "$out/"
            # each arm's training log and plan (the start-up of ~2 minutes even after a warm calibration is not
            # understood: its log lines say where it goes)
            mkdir -p "$out/work" && cp /tmp/sr/*.log /tmp/sr/*.plan.json "$out/work/" 2>/dev/null
            for r in /tmp/sr/runs/*/; do
              n=$(basename "$r"); cp "$r/train.log" "$out/work/$n.train.log" 2>/dev/null
              cp "$r/metrics.jsonl" "$out/work/$n.metrics.jsonl" 2>/dev/null
            done
            tail -c 3000 "$out/sweep.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
