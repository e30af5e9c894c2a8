#!/bin/bash
# cpu2 scratch pixels arm, image loss 0.1, the study's data and schedule; the image on whole 12-byte patches
cd /work/main
export OMP_NUM_THREADS=1
/work/main/.venv/bin/python -m omnibyte train clevr_vqa_pixels task.root=/tmp/study3/data/clevr run_name=pixels_al12_s0 seed=0 'model.stages=[{"length": 170, "width": 128, "layers": 2, "block": {"name": "transformer", "heads": 4}}, {"length": 12, "width": 64, "layers": 2, "block": {"name": "transformer", "heads": 2}}]' out_dir=/tmp/align/runs train.progress=false train.ckpt_every=0 train.keep_last=1 eval.select=bpb/answer 'serializer.image.size=[32,20]' serializer.image_align=12 data.seq_len=2040 data.batch_size=16 data.pad_to=longest train.steps=1800 train.lr=2e-3 train.min_lr=2e-4 train.warmup=50 train.eval_every=300 train.log_every=50 eval.max_samples=400 data.workers=0 serializer.loss=weights serializer.weights.image=0.1 --quiet > /tmp/align/train.log 2>&1 && \
/work/main/.venv/bin/python /work/main/results/run_transfer.py eval --vqa-samples 0 --answer-rows 600 --blind --per-token-rows 4 /tmp/align/runs/pixels_al12_s0 > /tmp/align/eval.log 2>&1
echo done $? >> /tmp/align/eval.log
