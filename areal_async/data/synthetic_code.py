"""A synthetic coding task a tiny model learns on a CPU: complete `def f(x): return ` so that f matches a table.

The prompt shows three input/output pairs of f(x) = a*x + b (a in 1..9, b in 0..19, x in 0..9):

    f(2)=7 f(5)=13 f(1)=5
    def f(x): return

and the model completes the expression (`2*x+3`). The tests run in the code sandbox as a HumanEval problem (the
prompt's `def` line followed by the completion) and check f on all ten inputs, seven of which the prompt does not
show: a table lookup fails, the function passes.
"""

from __future__ import annotations

import hashlib
import random

from areal_async.data.records import PromptRecord
from areal_async.reward.code_verifier import encoded_tests

HELD_OUT_BUCKETS = 10  # one problem in ten (by hash) is reserved for the held-out set
SIGNATURE = "def f(x): return "
INPUTS = range(10)
SHOWN = 3
SLOPES = range(1, 10)
OFFSETS = range(0, 20)


def expression(slope: int, offset: int) -> str:
    return f"{slope}*x+{offset}"


def table_prompt(slope: int, offset: int, shown: list[int]) -> str:
    pairs = " ".join(f"f({x})={slope * x + offset}" for x in shown)
    return f"{pairs}\n{SIGNATURE}"


def table_tests(slope: int, offset: int) -> str:
    """HumanEval's `check(candidate)` over every input."""
    cases = "".join(f"    assert candidate({x}) == {slope * x + offset}\n" for x in INPUTS)
    return f"def check(candidate):\n{cases}"


def _is_held_out(prompt: str) -> bool:
    return hashlib.sha256(prompt.encode()).digest()[0] % HELD_OUT_BUCKETS == 0


def code_table_problems(count: int, seed: int, held_out: bool) -> list[PromptRecord]:
    """`count` distinct problems of the training split (held_out=False) or the held-out one (disjoint by a hash of
    the prompt, so any seeds can be combined). Each record's one solution is its encoded tests."""
    rng = random.Random(seed)
    records: list[PromptRecord] = []
    seen: set[str] = set()
    possible = len(SLOPES) * len(OFFSETS) * 720  # ordered choices of 3 shown inputs of 10
    most = possible // (HELD_OUT_BUCKETS * 2) if held_out else possible // 2  # sampling stays quick below these
    if count > most:
        raise ValueError(f"asked for {count} table problems: at most {most} in the {'held-out' if held_out else 'training'} split")
    while len(records) < count:
        slope, offset = rng.choice(SLOPES), rng.choice(OFFSETS)
        prompt = table_prompt(slope, offset, rng.sample(list(INPUTS), SHOWN))
        if prompt in seen or _is_held_out(prompt) != held_out:
            continue
        seen.add(prompt)
        tests = encoded_tests({"prompt": SIGNATURE, "entry_point": "f", "test": table_tests(slope, offset)})
        records.append(PromptRecord(f"table-{len(records)}" + ("-heldout" if held_out else ""), prompt, (tests,),
                                    task="code"))
    return records


def table_of(record: PromptRecord) -> tuple[int, int]:
    """(slope, offset) of a table problem, read back from its shown pairs."""
    pairs = [pair.removeprefix("f(").split(")=") for pair in record.prompt.split("\n")[0].split()]
    (x0, y0), (x1, y1) = [(int(x), int(y)) for x, y in pairs[:2]]
    slope = (y1 - y0) // (x1 - x0)
    return slope, y0 - slope * x0


def code_demonstration(record: PromptRecord, rng: random.Random, error_rate: float) -> str:
    """A supervised completion for `record`: its expression, or with probability `error_rate` one whose slope or
    offset is off by one (a teacher that is right only part of the time)."""
    slope, offset = table_of(record)
    if rng.random() < error_rate:
        if rng.random() < 0.5:
            slope = max(1, slope + rng.choice((-1, 1)))
        else:
            offset = max(0, offset + rng.choice((-1, 1)))
    return expression(slope, offset)
