#!/usr/bin/env bash
# Reproduce llavakit's shipped model, llava-shapes: the synthetic shapes world, a SigLIP tower
# pretrained on it, a tiny LLaVA-OneVision assembled from that tower and a Qwen2 size spec, stage 1
# (projector on captions), stage 2 (projector and language model on single questions, the tower
# frozen), and the held-out evaluation. About 40 minutes on 2 CPU cores.
#
#   scripts/train_shapes_model.sh [WORK_DIR]      (default: ./shapes-run; the model ends in WORK_DIR/model)
#
# N (train pictures), VIDEOS (train clips), TOWER_STEPS, STEPS (stage 2 steps) and LR (stage 2's
# peak learning rate) change the run, smaller for a try-out; SEED changes every random choice
# (default 0, the shipped model's).
set -euo pipefail
WORK=${1:-shapes-run}
LLAVAKIT=${LLAVAKIT:-llavakit}
SEED=${SEED:-0}
N=${N:-80000}
VIDEOS=${VIDEOS:-15000}
mkdir -p "$WORK"
$LLAVAKIT make-shapes --out "$WORK/data" --n "$N" --per-image 3 --n-videos "$VIDEOS" --n-test 900 --seed "$SEED" > "$WORK/data.json"
# The tower first, on its own: what each patch holds and which patch it is (under a minute).
$LLAVAKIT pretrain-tower --out "$WORK/tower" --steps ${TOWER_STEPS:-1600} --batch-size 64 --seed "$SEED" \
    --vision siglip:image_size=96,patch_size=32,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512 \
    > "$WORK/tower.json"
$LLAVAKIT init --family llava_onevision --out "$WORK/init" --seed "$SEED" --vision "$WORK/tower" \
    --text qwen2:hidden_size=256,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2,intermediate_size=512,max_position_embeddings=2048 \
    --tokenizer-corpus "$WORK/data/train.jsonl" --tokenizer-corpus "$WORK/data/captions.jsonl" > /dev/null
# Stage 1: only the projector (and the image newline) learn, on captions.
$LLAVAKIT train --model "$WORK/init" --data "$WORK/data/captions.jsonl" --out "$WORK/stage1" --overwrite --stage projector \
    --max-steps 150 --batch-size 32 --lr 2e-3 --warmup-ratio 0.05 --seed "$SEED"
# Stage 2: projector and language model learn on single questions, picture pairs and clips; the
# pretrained tower stays frozen (trained through the language model's loss it forgets shapes' kinds).
$LLAVAKIT train --model "$WORK/stage1" --data "$WORK/data/train.jsonl" --out "$WORK/model" --overwrite --stage full \
    --max-steps ${STEPS:-9000} --batch-size 32 --lr ${LR:-5e-4} --warmup-ratio 0.03 --bf16 --compile --seed "$SEED"
$LLAVAKIT eval --model "$WORK/model" --data "$WORK/data/test.jsonl" --dtype float32 | tee "$WORK/eval.md"
