"""A verifiable synthetic task that runs anywhere: integer arithmetic with answers in \\boxed{}."""

from __future__ import annotations

import hashlib
import random

from areal_async.config import ArithmeticConfig
from areal_async.data.records import PromptRecord

HELD_OUT_BUCKETS = 10  # one problem in ten (by hash) is reserved for the held-out set


def evaluate_expression(expression: str) -> int:
    """Value of 'a+b*c-d' with the usual precedence (* before + and -), without eval."""
    total, term, sign, number = 0, 1, 1, ""
    pending_op = "*"
    for char in expression + "+":
        if char.isdigit():
            number += char
            continue
        term = term * int(number) if pending_op == "*" else int(number)
        number = ""
        if char == "*":
            pending_op = "*"
        else:
            total += sign * term
            sign, term, pending_op = (1 if char == "+" else -1), 1, "*"
    return total


def prompt_text(expression: str) -> str:
    return f"Q: {expression}\nA: "


def answer_text(value: int) -> str:
    return f"\\boxed{{{value}}}"


def _is_held_out(expression: str) -> bool:
    digest = hashlib.sha256(expression.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def _random_expression(rng: random.Random, spec: ArithmeticConfig) -> str:
    count = rng.randint(spec.min_operands, spec.max_operands)
    parts = [str(rng.randint(0, spec.max_operand))]
    for _ in range(count - 1):
        parts += [rng.choice(spec.operators), str(rng.randint(0, spec.max_operand))]
    return "".join(parts)


def arithmetic_problems(count: int, spec: ArithmeticConfig, seed: int, held_out: bool) -> list[PromptRecord]:
    """`count` distinct problems from the training split (held_out=False) or the held-out split.

    The two splits are disjoint by construction (a hash of the expression picks the split), so any seeds
    can be combined without leaking held-out problems into training.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct problems from {spec}: the problem space is too small")
        expression = _random_expression(rng, spec)
        if expression in seen or _is_held_out(expression) != held_out:
            continue
        seen.add(expression)
        split = "heldout" if held_out else "train"
        records.append(
            PromptRecord(
                query_id=f"arith-{split}-{len(records)}",
                prompt=prompt_text(expression),
                solutions=(answer_text(evaluate_expression(expression)),),
                task="math",
            )
        )
    return records


NEAR_MISSES = (-10, -2, -1, 1, 2, 10)


def expression_of(record: PromptRecord) -> str:
    return record.prompt.removeprefix("Q: ").removesuffix("\nA: ")


def worked_steps(expression: str, error_at: int | None = None, error: int = 0) -> tuple[list[str], int]:
    """Left-to-right running totals of a '+'/'-' expression: ["37+45=82", "82-12=70"] and the final value.
    Step `error_at` (0-based) adds `error` to its result, and the later steps carry the slip on."""
    numbers, operators, number = [], [], ""
    for char in expression:
        if char.isdigit():
            number += char
        else:
            numbers.append(int(number))
            operators.append(char)
            number = ""
    numbers.append(int(number))
    if set(operators) - set("+-"):
        raise ValueError(f"worked steps need '+' and '-' only, got {expression!r}")
    total, steps = numbers[0], []
    for index, (operator, operand) in enumerate(zip(operators, numbers[1:])):
        result = total + operand if operator == "+" else total - operand
        if index == error_at:
            result += error
        steps.append(f"{total}{operator}{operand}={result}")
        total = result
    return steps, total


def noisy_demonstration(record: PromptRecord, rng: random.Random, error_rate: float, steps: bool = False) -> str:
    """A supervised response for `record`: the boxed gold answer, or with probability `error_rate` a
    near-miss (off by 1, 2 or 10), imitating a teacher that is right only part of the time. With `steps` the
    answer follows its worked steps ("37+45=82, 82-12=70. \\boxed{70}"), and the near-miss is a slip in one
    step that the later steps carry on."""
    slipped = rng.random() < error_rate
    error = rng.choice(NEAR_MISSES) if slipped else 0
    if steps:
        expression = expression_of(record)
        error_at = rng.randrange(max(1, expression.count("+") + expression.count("-"))) if slipped else None
        lines, value = worked_steps(expression, error_at, error)
        return f"{', '.join(lines)}. {answer_text(value)}"
    gold = int(record.solutions[0].removeprefix("\\boxed{").removesuffix("}"))
    return answer_text(gold + error)
