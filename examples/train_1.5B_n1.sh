#!/usr/bin/env bash
# The seed's 1.5B recipe (configs/recipe_1.5B.yaml) on one node of 8 GPUs (configs/cluster/n1.yaml), Ray in-process:
#   bash examples/train_1.5B_n1.sh MODEL_PATH DATA_JSONL ID2INFO_JSON MAX_NEW_TOKENS [overrides...]
# DRY_RUN=1 prints the resolved config, PLAN=1 the placement and GPU memory (examples/recipe.sh).
source "$(dirname "$0")/recipe.sh" recipe_1.5B n1 "$@"
