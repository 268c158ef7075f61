#!/usr/bin/env bash
# Reproduce llavakit's shipped model, llava-shapes: the synthetic shapes world, a tiny LLaVA-OneVision
# assembled from size specs, stage 1 (projector on captions), stage 2 (everything on instructions),
# and the held-out evaluation. About 27 minutes on 2 CPU cores.
#
#   scripts/train_shapes_model.sh [WORK_DIR]      (default: ./shapes-run; the model ends in WORK_DIR/model)
set -euo pipefail
WORK=${1:-shapes-run}
LLAVAKIT=${LLAVAKIT:-llavakit}
SEED=${SEED:-0}
mkdir -p "$WORK"
$LLAVAKIT make-shapes --out "$WORK/data" --n 20000 --n-test 700 --seed "$SEED" > "$WORK/data.json"
$LLAVAKIT init --family llava_onevision --out "$WORK/init" --seed "$SEED" \
    --vision siglip:image_size=96,patch_size=16,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512 \
    --text qwen2:hidden_size=256,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2,intermediate_size=512,max_position_embeddings=2048 \
    --tokenizer-corpus "$WORK/data/train.jsonl" --tokenizer-corpus "$WORK/data/captions.jsonl" > /dev/null
# Stage 1: only the projector (and the image newline) learn, on captions.
$LLAVAKIT train --model "$WORK/init" --data "$WORK/data/captions.jsonl" --out "$WORK/stage1" --stage projector \
    --max-steps 150 --batch-size 32 --lr 2e-3 --warmup-ratio 0.05 --seed "$SEED"
# Stage 2: tower, projector and language model learn, on multi-turn questions, image pairs and clips.
$LLAVAKIT train --model "$WORK/stage1" --data "$WORK/data/train.jsonl" --out "$WORK/model" --stage full \
    --train-vision --max-steps ${STEPS:-2500} --batch-size 16 --lr 1e-3 --warmup-ratio 0.03 --compile --seed "$SEED"
$LLAVAKIT eval --model "$WORK/model" --data "$WORK/data/test.jsonl" --dtype float32 | tee "$WORK/eval.md"
