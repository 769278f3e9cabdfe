#!/usr/bin/env bash
# The seed's 1.5B recipe (configs/recipe_1.5B.yaml) on a Ray cluster of 4 nodes x 8 GPUs (configs/cluster/n4.yaml):
#   bash examples/train_1.5B_n4_on_ray.sh MODEL_PATH DATA_JSONL ID2INFO_JSON MAX_NEW_TOKENS [overrides...]
# DRY_RUN=1 prints the resolved config, PLAN=1 the placement and GPU memory (examples/recipe.sh).
source "$(dirname "$0")/recipe.sh" recipe_1.5B n4 "$@"
