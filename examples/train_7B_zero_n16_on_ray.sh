#!/usr/bin/env bash
# The seed's Qwen2.5-7B zero-RL recipe (configs/recipe_7B_zero.yaml) on a Ray cluster of 16 nodes x 8 GPUs (configs/cluster/n16.yaml):
#   bash examples/train_7B_zero_n16_on_ray.sh MODEL_PATH DATA_JSONL ID2INFO_JSON MAX_NEW_TOKENS [overrides...]
# DRY_RUN=1 prints the resolved config, PLAN=1 the placement and GPU memory (examples/recipe.sh).
source "$(dirname "$0")/recipe.sh" recipe_7B_zero n16 "$@"
