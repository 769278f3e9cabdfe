#!/usr/bin/env bash
# The 1.5B recipe on 16 node(s) x 8 GPUs: bash examples/run_n16.sh MODEL_PATH PROMPTS_JSONL ID2INFO_JSON MAX_NEW_TOKENS
exec bash "$(dirname "$0")/train_on_ray.sh" 16 "$@"
