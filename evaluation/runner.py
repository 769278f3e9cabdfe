"""Evaluation as a library call: sample every problem of every benchmark, judge the answers, summarize.

:func:`evaluate` is what both the command line (``areal-async eval``) and the trainer call. It works with any
engine that offers ``generate(prompts: list[list[int]], params: SamplingParams) -> list[Generation]``.

Reproducibility and resume. The samples of one benchmark are planned as a fixed list of requests (problem
index, sample index), problem-major, cut into batches of ``batch_size`` requests. Each batch is one generate
call whose seed is derived from (seed, benchmark, problem index, sample index) of its first request, so a
batch's samples do not depend on what ran before. With an output folder, each finished batch is appended to
``samples/<benchmark>.jsonl`` in one write; a restarted run skips every batch whose samples are all there,
which makes a resumed run produce the same samples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from areal_async.types import SamplingParams
from areal_async.files import write_json_atomically
from areal_async.reward.extraction import extract_answer
from areal_async.reward.code_reward import extract_code
from evaluation.benchmarks import Benchmark
from evaluation.metrics import summarize_samples
from areal_async.prompts import encode_prompt, judged_text, prompt_format

SETTINGS_FILE = "settings.json"


class RunFolderMismatch(ValueError):
    """An output folder holds samples made with other settings, so it cannot be resumed with these."""


@dataclass(frozen=True)
class EvalSettings:
    """What decides the samples: sampling parameters, prompt type, seed and the batch plan.

    max_gen_tokens is the limit on new tokens per response; top_k = 0 and top_p = 1 disable truncation;
    temperature <= 0 is greedy decoding. batch_size is the number of requests per generate call (it is part
    of the sampling plan, so a run folder must be resumed with the same value).
    """

    num_samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_gen_tokens: int = 32768
    prompt_type: str = "r1_distilled"  # a config.PromptType name
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_gen_tokens < 1:
            raise ValueError(f"max_gen_tokens must be >= 1, got {self.max_gen_tokens}")
        prompt_format(self.prompt_type)


def derive_seed(seed: int, benchmark: str, problem_index: int, sample_index: int) -> int:
    """A 63-bit generation seed that depends only on its arguments (SHA-256 of them)."""
    digest = hashlib.sha256(f"{seed}:{benchmark}:{problem_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_batches(num_problems: int, num_samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The requests (problem index, sample index), problem-major, cut into batches of `batch_size`."""
    requests = [(p, s) for p in range(num_problems) for s in range(num_samples)]
    return [requests[start : start + batch_size] for start in range(0, len(requests), batch_size)]


def evaluate(
    engine,
    tokenizer,
    verifier,
    benchmarks: Sequence[Benchmark],
    settings: EvalSettings,
    out_dir: str | os.PathLike | None = None,
    show_progress: bool = False,
    identity: Mapping[str, Any] | None = None,
    max_context: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluates one model on `benchmarks` and returns {benchmark name: summary}.

    Args:
        engine: Has ``generate(prompts, params)`` (TorchEngine, the vLLM engine, or a fake in tests).
        tokenizer: Has ``encode(text, add_special_tokens=...)``, ``decode(ids, skip_special_tokens=True)``
            and ``eos_token_id`` (generation stops at EOS).
        verifier: Has ``check_batch(responses, gold_lists) -> list[bool]`` and ``extract_mode`` (a
            RewardVerifier: judging runs in its sandboxed pool), or a mapping from task ("math", "code") to
            one (a code benchmark's responses go to a CodeVerifier, which runs its tests).
        benchmarks: Loaded benchmarks (see evaluation.benchmarks.load_benchmark).
        settings: Sampling settings.
        out_dir: If given, ``samples/<benchmark>.jsonl`` (one line per sample), ``summary/<benchmark>.json``
            and ``settings.json`` are written there, and samples already present are not generated again.
            A folder made with other settings (or `identity`) raises RunFolderMismatch.
        show_progress: A tqdm bar per benchmark.
        identity: What else names the run (checkpoint, engine, ...): recorded and checked on resume.
        max_context: The model's context length; prompts longer than max_context - max_gen_tokens are
            counted in the summary (``prompts_over_context``) and a warning is printed.

    A summary holds pass@1 (averaged over samples, then problems) with its standard error over problems,
    pass@k for k = 1..num_samples, the mean response length in tokens, the truncated fraction, and the run's
    settings (see evaluation.metrics.summarize_samples).
    """
    folder = Path(out_dir) if out_dir is not None else None
    identity = dict(identity or {})
    if folder is not None:
        _prepare_folder(folder, settings, identity, benchmarks)
    summaries = {}
    for benchmark in benchmarks:
        summaries[benchmark.name] = _evaluate_benchmark(
            engine, tokenizer, verifier, benchmark, settings, folder, show_progress, identity, max_context
        )
    return summaries


def _evaluate_benchmark(engine, tokenizer, verifier, benchmark, settings, folder, show_progress, identity,
                        max_context) -> dict[str, Any]:
    started = time.perf_counter()
    task = benchmark.spec.task
    if isinstance(verifier, Mapping):  # one verifier per task: a code benchmark's tests, a math one's answers
        if task not in verifier:
            raise ValueError(f"benchmark {benchmark.name} needs a {task} verifier; this evaluation has "
                             f"{sorted(verifier)}")
        verifier = verifier[task]
    # a code problem's text says how to answer (a fenced program): no math template around it
    prompt_type = prompt_format("none" if task == "code" else settings.prompt_type)
    extract_mode = getattr(verifier, "extract_mode", "auto")
    eos = getattr(tokenizer, "eos_token_id", None)
    params = dict(max_new_tokens=settings.max_gen_tokens, temperature=settings.temperature, top_p=settings.top_p,
                  top_k=settings.top_k, stop_token_ids=() if eos is None else (int(eos),))
    problems = benchmark.problems
    prompt_ids = [encode_prompt(tokenizer, prompt_type.render(p.text)) for p in problems]
    over_context = 0
    if max_context is not None:
        over_context = sum(len(ids) + settings.max_gen_tokens > max_context for ids in prompt_ids)
        if over_context:
            print(f"warning: {benchmark.name}: {over_context} of {len(problems)} prompts plus max_gen_tokens="
                  f"{settings.max_gen_tokens} exceed the model's context of {max_context} tokens")

    samples_path = folder / "samples" / f"{benchmark.name}.jsonl" if folder is not None else None
    done = _read_samples(samples_path) if samples_path is not None else {}
    batches = plan_batches(len(problems), settings.num_samples, settings.batch_size)
    total = sum(len(b) for b in batches)
    finished = sum((problems[p].problem_id, s) in done for batch in batches for p, s in batch)
    generated = 0
    with tqdm(total=total, initial=finished, desc=f"eval {benchmark.name}", unit="sample",
              disable=not show_progress, dynamic_ncols=True) as progress:
        for batch in batches:
            missing = [(p, s) for p, s in batch if (problems[p].problem_id, s) not in done]
            if not missing:
                continue
            first_problem, first_sample = batch[0]
            seed = derive_seed(settings.seed, benchmark.name, first_problem, first_sample)
            outputs = engine.generate([prompt_ids[p] for p, _ in batch],
                                      SamplingParams(seed=seed, **params))
            if len(outputs) != len(batch):
                raise RuntimeError(f"engine returned {len(outputs)} generations for {len(batch)} prompts")
            by_request = dict(zip(batch, outputs))
            responses = [tokenizer.decode(list(by_request[r].tokens), skip_special_tokens=True) for r in missing]
            judged = [judged_text(text, prompt_type) for text in responses]
            correct = verifier.check_batch(judged, [list(problems[p].golds) for p, _ in missing])
            records = []
            for (p, s), response, view, ok in zip(missing, responses, judged, correct):
                output = by_request[(p, s)]
                records.append({
                    "problem_id": problems[p].problem_id,
                    "problem_index": p,
                    "sample_index": s,
                    "response": response,
                    "extracted_answer": extract_code(view) if task == "code" else extract_answer(view, extract_mode),
                    "gold": list(problems[p].golds),
                    "correct": bool(ok),
                    "num_tokens": len(output.tokens),
                    "finish_reason": output.finish_reason,
                })
            if samples_path is not None:
                _append_samples(samples_path, records)
            for record in records:
                done[(record["problem_id"], record["sample_index"])] = record
            generated += len(records)
            progress.update(len(records))

    ordered = [done[(problems[p].problem_id, s)] for batch in batches for p, s in batch]
    summary = {
        "benchmark": benchmark.name,
        "title": benchmark.spec.title,
        "file": str(benchmark.path),
        "sha256": benchmark.sha256,
        **summarize_samples(ordered, settings.num_samples),
        "prompts_over_context": over_context,
        "generated_this_call": generated,
        "seconds_this_call": round(time.perf_counter() - started, 3),
        "settings": asdict(settings),
        "identity": identity,
    }
    if folder is not None:
        write_json_atomically(folder / "summary" / f"{benchmark.name}.json", summary)
    return summary


# ---------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------


def _benchmark_record(benchmark: Benchmark) -> dict[str, Any]:
    spec = asdict(benchmark.spec)
    spec.pop("file")
    spec.pop("display_name")
    return {"file": str(benchmark.path), "sha256": benchmark.sha256, "num_problems": len(benchmark.problems),
            "spec": spec}


def _prepare_folder(folder: Path, settings: EvalSettings, identity: dict, benchmarks: Sequence[Benchmark]) -> None:
    """Writes settings.json, or checks it against these settings when the folder was used before.

    Benchmarks already recorded must match (file content, problem count, fields); new ones are added.
    """
    current = {"settings": asdict(settings), "identity": identity,
               "benchmarks": {b.name: _benchmark_record(b) for b in benchmarks}}
    settings_path = folder / SETTINGS_FILE
    if settings_path.is_file():
        recorded = json.loads(settings_path.read_text(encoding="utf-8"))
        differences = _differences("", {k: recorded.get(k) for k in ("settings", "identity")},
                                   {k: current[k] for k in ("settings", "identity")})
        for name, record in current["benchmarks"].items():
            if name in recorded.get("benchmarks", {}):
                old = dict(recorded["benchmarks"][name])
                old.pop("file", None)
                new = {k: v for k, v in record.items() if k != "file"}
                differences += _differences(f"benchmarks.{name}.", old, new)
        if differences:
            raise RunFolderMismatch(
                f"{folder} holds samples made with other settings, so it cannot be resumed with these:\n  "
                + "\n  ".join(differences)
                + "\nuse the recorded settings, or another output folder (--run-name / --output-dir)"
            )
        current["benchmarks"] = {**recorded.get("benchmarks", {}), **current["benchmarks"]}
    elif (folder / "samples").is_dir() and any((folder / "samples").iterdir()):
        raise RunFolderMismatch(f"{folder} holds samples but no {SETTINGS_FILE}; it cannot be resumed safely")
    write_json_atomically(settings_path, current)


def _differences(prefix: str, old: Any, new: Any) -> list[str]:
    """'key: recorded X, now Y' for every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(f"{prefix}{key}.", old.get(key), new.get(key))
        return out
    if old != new:
        return [f"{prefix.rstrip('.')}: recorded {json.dumps(old)}, now {json.dumps(new)}"]
    return []


def _read_samples(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Samples already written, by (problem id, sample index). A torn last line (a write cut off by a crash)
    is removed from the file; any other unreadable line is an error naming file and line."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    samples = {}
    good_bytes = 0
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not line.strip():
            good_bytes += len(line) + (0 if is_last else 1)
            continue
        try:
            record = json.loads(line)
            key = (str(record["problem_id"]), int(record["sample_index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            if is_last:  # no newline after it: the write never finished
                print(f"warning: {path}:{number}: dropping an unfinished sample line")
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise ValueError(f"{path}:{number}: unreadable sample line: {error}") from error
        if is_last:  # complete JSON but no trailing newline: keep it and finish the line
            with open(path, "ab") as f:
                f.write(b"\n")
        samples[key] = record
        good_bytes += len(line) + 1
    return samples


def _append_samples(path: Path, records: list[dict[str, Any]]) -> None:
    """Appends sample records in one write, then flushes them to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


