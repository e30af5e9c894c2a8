#!/usr/bin/env bash
# The GPU jobs behind benchmarks/RESULTS.md (model section). Run from the repository root on a machine
# with one H100 / H200, with the wheels of ../shared/wheels/gpu-py312 copied to .whl/:
#   bash benchmarks/run_gpu.sh part1 OUTDIR   # GPU tests, training throughput vs mblm, generation speed
#   bash benchmarks/run_gpu.sh part2 OUTDIR   # trainable context length
set -uo pipefail
part=${1:-part1}
out=${2:-/tmp/omnibyte_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/env.txt"
if [ "$part" = part1 ]; then
  timeout 170 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_model_mamba.py -rs 2>&1 | tee "$out/gpu_tests.log"
  timeout 230 python3 benchmarks/train_throughput.py --preset mblm360m --impl both --out "$out/bench.jsonl" 2>&1 \
    | tail -c 6000 | tee "$out/train.log"
  timeout 150 python3 benchmarks/generate.py --graph --mblm --out "$out/bench.jsonl" 2>&1 | tail -c 4000 \
    | tee "$out/gen.log"
else
  timeout 180 python3 benchmarks/train_throughput.py --preset mblm360m --impl both --steps 8 --warmup 2 \
    --out "$out/bench.jsonl" 2>&1 | tail -c 3000 | tee "$out/train.log"
  timeout 150 python3 benchmarks/train_throughput.py --preset mblm360m --impl omnibyte --compile --steps 8 \
    --warmup 3 --out "$out/bench.jsonl" 2>&1 | tail -c 3000 | tee "$out/train_compiled.log"
  timeout 130 python3 benchmarks/max_context.py --start-mib 8 --time-cap 100 --step-cap 60 --chunk-bytes 524288 \
    --out "$out/bench.jsonl" 2>&1 | tail -c 4000 | tee "$out/ctx.log"
fi
