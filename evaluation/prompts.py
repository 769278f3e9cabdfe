"""Prompt types for evaluation: the table lives in the core (areal_async/prompts.py), where training prompts are
templated with the same words."""

from areal_async.prompts import PLACEHOLDER, PROMPT_TYPES, PromptType, get_prompt_type, judged_text

__all__ = ["PLACEHOLDER", "PROMPT_TYPES", "PromptType", "get_prompt_type", "judged_text"]
