#!/usr/bin/env bash
# Reproduces the bundled default model (models/default/) from nothing, on the CPU:
#
#     bash scripts/train_default_model.sh
#
# toy-world dataset -> tiny VAE -> base pipeline (random transformer) -> precompute -> pretraining without TTT on
# 3-s segments -> stock "pretrained" CogVideoX -> TTT-MLP curriculum 3 s -> 15 s -> 60 s -> models/default/.
# Every setting is in configs/toy/ (docs/default_model.md explains them). Intermediate results go to outputs/toy/;
# delete it to start over. STORIES (default 100) sets the number of 20-segment training stories; FROM=N starts at
# step N (the earlier steps' outputs must be there), e.g. FROM=6 to redo only the TTT curriculum.
set -euo pipefail
cd "$(dirname "$0")/.."

# One thread per process: these tensors are small, and on a busy 2-core machine OpenMP's spinning worker threads made
# every step 5-20x slower than one thread (measured); set OMP_NUM_THREADS=2 on an idle machine if you like.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
STORIES="${STORIES:-100}"
FROM="${FROM:-1}"
start=$SECONDS
step() {  # step N "title": true when step N is to run (N >= FROM)
    if (( $1 < FROM )); then echo "== skip $1/9 $2"; return 1; fi
    echo "== [$(( (SECONDS - start) / 60 )) min] $1/9 $2"
}

if step 1 "toy-world dataset: $STORIES stories of 20 segments (60 s)"; then
    python -m pipeline.toyworld generate --out outputs/toy/dataset --stories "$STORIES" --segments 20 --seed 0
fi
if step 2 "tiny VAE"; then
    python -m pipeline.toy.vae --config configs/toy/base.yaml
fi
if step 3 "base pipeline: MiniLM text encoder, the VAE, DPM scheduler, random transformer"; then
    python -m pipeline.toy.model init --config configs/toy/base.yaml
fi
if step 4 "precompute latents and text embeddings"; then
    rm -rf outputs/toy/cache  # encoded by an earlier VAE otherwise
    # two processes, one per core (Accelerate's launcher; on the CPU it needs ACCELERATE_USE_CPU and --multi_gpu)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m pipeline.data.precompute \
        --config configs/toy/pretrain.yaml
fi
if step 5 "pretraining the transformer on 3-s segments (no TTT)"; then
    python train.py --config configs/toy/pretrain.yaml --overwrite  # FROM=N redoes a stage from its start
    python -m pipeline.toy.model to-base --export outputs/toy/pretrain/final --out outputs/toy/base
fi
if step 6 "TTT-MLP inserted, 3-s stage"; then
    python train.py --config configs/toy/ttt-mlp/3s.yaml --overwrite  # FROM=N redoes a stage from its start
fi
if step 7 "15-s stage"; then
    python train.py --config configs/toy/ttt-mlp/15s.yaml --overwrite  # FROM=N redoes a stage from its start
fi
if step 8 "60-s stage"; then
    python train.py --config configs/toy/ttt-mlp/60s.yaml --overwrite  # FROM=N redoes a stage from its start
fi
if step 9 "install into models/default"; then
    python -m pipeline.toy.model install --export outputs/toy/ttt-mlp/60s/final --out models/default
fi
echo "== done in $(( (SECONDS - start) / 60 )) min"
