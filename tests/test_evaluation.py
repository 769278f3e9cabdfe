"""Evaluation: pass@k and averaged pass@1, benchmark loading and its errors, prompt types, resume, the CLI end to
end on the bundled tiny checkpoint, and the real benchmark files when present."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest

from areal_async.types import Generation
from areal_async.data.synthetic import evaluate_expression, prompt_text
from areal_async.reward.extraction import extract_answer
from areal_async.run.sft import BUNDLED_WARMSTART
from evaluation import (
    KNOWN_BENCHMARKS,
    BenchmarkFormatError,
    BenchmarkSpec,
    EvalSettings,
    RunFolderMismatch,
    averaged_pass_at_1,
    evaluate,
    judged_text,
    load_benchmark,
    markdown_table,
    parse_benchmark_arg,
    pass_at_k,
    write_synthetic_benchmark,
)
from evaluation.eval_and_aggregate import EngineNotAvailable, open_engine
from areal_async.config import PromptType
from areal_async.prompts import PROMPT_FORMATS, encode_prompt
from evaluation.runner import derive_seed, plan_batches

EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
needs_eval_data = pytest.mark.skipif(not EVAL_DATA.is_dir(), reason=f"{EVAL_DATA} not present")
SYNTHETIC = KNOWN_BENCHMARKS["synthetic"]
EOS = 258


# ---------------------------------------------------------------------------
# Fakes: a byte tokenizer, an engine that answers arithmetic right or off by one, a string-compare verifier
# ---------------------------------------------------------------------------


class ByteTokenizer:
    eos_token_id = EOS
    pad_token_id = 256

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode()


class FakeEngine:
    """Answers `Q: a+b\\nA: ` prompts with \\boxed{value}, or value+1 with probability 1/2, drawn from the call's
    seed and the row, so a batch's samples depend only on its prompts and seed. Every 3rd sample of a problem
    runs out of tokens (finish_reason "length"). `fail_after` raises on that call, like a crash."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.fail_after = fail_after

    def generate(self, prompts, params):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append((len(prompts), params.seed))
        rng = random.Random(params.seed)
        outputs = []
        for prompt in prompts:
            expression = bytes(prompt).decode().removeprefix("Q: ").removesuffix("\nA: ")
            value = evaluate_expression(expression) + (rng.random() < 0.5)
            tokens = list(f"\\boxed{{{value}}}".encode())
            if rng.random() < 0.3:
                outputs.append(Generation(tokens[:3], [0.0] * 3, [0] * 3, "length"))
            else:
                outputs.append(Generation(tokens + [EOS], [0.0] * (len(tokens) + 1), [0] * (len(tokens) + 1), "stop"))
        return outputs


class StringVerifier:
    extract_mode = "auto"

    def check_batch(self, responses, golds):
        return [extract_answer(r) in g for r, g in zip(responses, golds)]


def synthetic_benchmark(tmp_path, count=10):
    path = write_synthetic_benchmark(tmp_path / f"synthetic{count}.jsonl", count)
    return load_benchmark(SYNTHETIC, path)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 3) == 1.0  # every 3 of 4 include a correct one
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    for n, c, k in [(64, 5, 8), (200, 17, 100), (1024, 3, 512)]:  # product form vs exact binomials
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_averaged_pass_at_1_and_its_standard_error():
    mean, stderr = averaged_pass_at_1([[True, False], [True, True], [False, False]])
    assert mean == pytest.approx(0.5)
    # per-problem means 0.5, 1, 0: sample std 0.5, over sqrt(3) problems
    assert stderr == pytest.approx(0.5 / math.sqrt(3))
    assert averaged_pass_at_1([[True, False, True]]) == (pytest.approx(2 / 3), 0.0)


def test_markdown_table_has_one_row_per_checkpoint_and_one_column_per_benchmark():
    row = {"pass@1": 0.4567, "pass@1_stderr": 0.0123}
    table = markdown_table({"ckpt-a": {"gsm8k": row}, "ckpt-b": {"gsm8k": row, "aime24": row}},
                           ["aime24", "gsm8k"], {"aime24": "AIME 2024", "gsm8k": "GSM8K"}, caption="n=4")
    lines = table.strip().splitlines()
    assert lines[0] == "| checkpoint | AIME 2024 | GSM8K |"
    assert lines[2] == "| ckpt-a | – | 45.7 ± 1.2 |"
    assert lines[3] == "| ckpt-b | 45.7 ± 1.2 | 45.7 ± 1.2 |"
    assert lines[-1] == "n=4"


# ---------------------------------------------------------------------------
# Benchmark files
# ---------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": \n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:3: malformed JSON")):
        load_benchmark(BenchmarkSpec("bench", str(path)), path)
    path.write_text('{"problem": "1+1", "answer": "2"}\n[1, 2]\n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:2: expected a JSON object")):
        load_benchmark(BenchmarkSpec("bench", str(path)), path)


def test_missing_or_empty_answer_is_an_error_not_a_zero(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "solution": "4"}\n')
    with pytest.raises(BenchmarkFormatError) as error:
        load_benchmark(BenchmarkSpec("bench", str(path)), path)
    assert isinstance(error.value, ValueError)
    assert error.value.line == 2 and str(error.value).startswith(f"{path}:2: missing answer field 'answer'")
    # the answer field is set per benchmark; here line 1 lacks the configured one
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:1: missing answer field 'solution'")):
        load_benchmark(BenchmarkSpec("bench", str(path), answer_field="solution"), path)
    path.write_text('{"problem": "1+1", "answer": ""}\n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:1: answer field 'answer' is empty")):
        load_benchmark(BenchmarkSpec("bench", str(path)), path)
    path.write_text('{"question": "1+1", "answer": "2"}\n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:1: missing problem field 'problem'")):
        load_benchmark(BenchmarkSpec("bench", str(path)), path)


def test_fields_ids_limit_and_gsm8k_answer_format(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        json.dumps({"question": "q1", "answer": "work <<2*3=6>>6\n#### 1,234"}) + "\n"
        + json.dumps({"question": "q2", "answer": "#### 7"}) + "\n"
        + json.dumps({"question": "q3", "answer": "12"}) + "\n"
    )
    spec, explicit = parse_benchmark_arg(f"gsm8k={path}")
    assert explicit and spec.problem_field == "question" and spec.answer_format == "after_hashes"
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{path}:3: answer has no '#### <answer>' line")):
        load_benchmark(spec, path)
    path.write_text(path.read_text().replace('"12"', '"#### 12"'))
    bench = load_benchmark(spec, path, limit=2)
    assert [p.golds for p in bench.problems] == [("1234",), ("7",)]
    assert [p.problem_id for p in bench.problems] == ["gsm8k-1", "gsm8k-2"]
    limited, _ = parse_benchmark_arg(f"gsm8k={path},limit=1")
    assert [p.golds for p in load_benchmark(limited, path).problems] == [("1234",)]
    assert len(load_benchmark(limited, path, limit=3).problems) == 1  # the smaller limit wins
    custom, _ = parse_benchmark_arg(f"mine={path},problem=question,format=after_hashes,title=Mine")
    assert (custom.name, custom.problem_field, custom.answer_format, custom.title) == (
        "mine", "question", "after_hashes", "Mine")
    numbers = tmp_path / "amc.jsonl"
    numbers.write_text('{"id": 3, "problem": "p", "answer": 27.0}\n{"id": 3, "problem": "p", "answer": 1}\n')
    with pytest.raises(BenchmarkFormatError, match=re.escape(f"{numbers}:2: duplicate id '3'")):
        load_benchmark(KNOWN_BENCHMARKS["amc23"], numbers)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        parse_benchmark_arg("nope")


def test_synthetic_benchmark_is_held_out_and_boxed_prompt_is_the_training_prompt(tmp_path):
    from areal_async.config import ArithmeticConfig
    from areal_async.data.synthetic import arithmetic_problems

    bench = synthetic_benchmark(tmp_path, count=50)
    heldout = arithmetic_problems(50, ArithmeticConfig(), seed=1, held_out=True)
    train = {r.prompt for r in arithmetic_problems(10000, ArithmeticConfig(), seed=0, held_out=False)}
    boxed = PROMPT_FORMATS[PromptType.boxed]
    for problem, record in zip(bench.problems, heldout):
        assert boxed.render(problem.text) == prompt_text(problem.text) == record.prompt
        assert record.solutions == (f"\\boxed{{{problem.golds[0]}}}",)
        assert record.prompt not in train


def test_prompts_are_encoded_with_one_bos_whether_templated_or_not(tmp_path):
    """A tokenizer configured like R1-Distill's (it adds its BOS, `<｜begin▁of▁sentence｜>`): the R1-distilled
    template already begins with that text, so training, held-out and benchmark prompts (all through
    encode_prompt) start with exactly one BOS; a plain prompt gets the tokenizer's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos = "<｜begin▁of▁sentence｜>"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens([bos, "<｜User｜>", "<｜Assistant｜>"])
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos)
    templated = PROMPT_FORMATS[PromptType.r1_distilled].render("What is 1+1?")
    assert tokenizer.encode(templated)[:2] == [bos_id, bos_id]  # the double BOS of encoding with the default
    ids = encode_prompt(tokenizer, templated)
    assert ids[0] == bos_id and ids[1] != bos_id and ids.count(bos_id) == 1
    plain = encode_prompt(tokenizer, "Q: 1+1\nA: ")
    assert plain[0] == bos_id and plain.count(bos_id) == 1


def test_prompt_types_and_judged_text():
    r1 = PROMPT_FORMATS[PromptType.r1_distilled]
    assert r1.render("What is 1+1?") == ("<｜begin▁of▁sentence｜><｜User｜>What is 1+1?\nPlease reason step by step, "
                                         "and put your final answer within \\boxed{}.<｜Assistant｜><think>\n")
    orz = PROMPT_FORMATS[PromptType.orz]
    assert orz.render("P").endswith("User: P\nAssistant: <think>")
    assert extract_answer(judged_text("<think>2 or 3</think> <answer>\\frac{1}{2}</answer>", orz)) == "\\frac{1}{2}"
    assert extract_answer(judged_text("<think>x</think><answer>so \\boxed{4} </answer>", orz)) == "4"
    assert judged_text("no tags, \\boxed{5}", orz) == "no tags, \\boxed{5}"
    assert judged_text("<answer>7</answer>", PROMPT_FORMATS[PromptType.boxed]) == "<answer>7</answer>"


# ---------------------------------------------------------------------------
# evaluate(): statistics, resume, settings check
# ---------------------------------------------------------------------------


def test_pass_at_1_equals_mean_sample_correctness(tmp_path):
    bench = synthetic_benchmark(tmp_path, count=10)
    settings = EvalSettings(num_samples=4, temperature=1.0, prompt_type="boxed", batch_size=8, max_gen_tokens=16)
    summary = evaluate(FakeEngine(), ByteTokenizer(), StringVerifier(), [bench], settings, out_dir=tmp_path / "run")
    summary = summary["synthetic"]
    samples = read_jsonl(tmp_path / "run" / "samples" / "synthetic.jsonl")
    assert len(samples) == 40 and summary["num_problems"] == 10 and summary["num_samples"] == 4
    correct = [s["correct"] for s in samples]
    assert 0 < sum(correct) < 40  # the fake engine mixes right and wrong answers
    assert summary["pass@1"] == pytest.approx(sum(correct) / len(correct))
    assert summary["pass@k"]["1"] == pytest.approx(summary["pass@1"])
    counts = [sum(s["correct"] for s in samples if s["problem_index"] == p) for p in range(10)]
    assert summary["pass@k"]["4"] == pytest.approx(sum(c > 0 for c in counts) / 10)
    assert summary["truncated_fraction"] == pytest.approx(sum(s["finish_reason"] == "length" for s in samples) / 40)
    assert summary["mean_response_tokens"] == pytest.approx(sum(s["num_tokens"] for s in samples) / 40)
    for s in samples:  # the recorded correctness agrees with the recorded answer and gold
        assert s["correct"] == (s["extracted_answer"] in s["gold"])
    on_disk = json.loads((tmp_path / "run" / "summary" / "synthetic.json").read_text())
    assert on_disk["pass@1"] == summary["pass@1"]


def test_seeds_depend_on_seed_problem_and_sample_only():
    assert derive_seed(0, "b", 3, 1) == derive_seed(0, "b", 3, 1)
    assert len({derive_seed(0, "b", 3, 1), derive_seed(1, "b", 3, 1), derive_seed(0, "b", 1, 3),
                derive_seed(0, "c", 3, 1)}) == 4
    assert plan_batches(3, 2, 4) == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1)]]


def test_resume_skips_finished_samples_and_equals_an_uninterrupted_run(tmp_path):
    bench = synthetic_benchmark(tmp_path, count=10)
    settings = EvalSettings(num_samples=4, temperature=1.0, prompt_type="boxed", batch_size=8, max_gen_tokens=16)
    args = (ByteTokenizer(), StringVerifier(), [bench], settings)

    whole = FakeEngine()
    uninterrupted = evaluate(whole, *args, out_dir=tmp_path / "whole")
    assert len(whole.calls) == 5  # 40 requests in batches of 8

    crashed = FakeEngine(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(crashed, *args, out_dir=tmp_path / "resumed")
    samples_file = tmp_path / "resumed" / "samples" / "synthetic.jsonl"
    assert len(read_jsonl(samples_file)) == 16
    with open(samples_file, "a") as f:  # a write cut off by the crash
        f.write('{"problem_id": "arith-heldout-4", "sampl')

    resumed_engine = FakeEngine()
    resumed = evaluate(resumed_engine, *args, out_dir=tmp_path / "resumed")
    assert resumed_engine.calls == whole.calls[2:]  # only the 3 unfinished batches, with the same seeds
    assert resumed["synthetic"]["generated_this_call"] == 24

    def by_key(path):
        return {(s["problem_id"], s["sample_index"]): s for s in read_jsonl(path)}

    assert by_key(samples_file) == by_key(tmp_path / "whole" / "samples" / "synthetic.jsonl")
    for key in ("pass@1", "pass@1_stderr", "pass@k", "mean_response_tokens", "truncated_fraction"):
        assert resumed["synthetic"][key] == uninterrupted["synthetic"][key]

    again = FakeEngine()
    evaluate(again, *args, out_dir=tmp_path / "resumed")
    assert again.calls == []  # nothing left to generate


def test_resume_with_other_settings_is_refused(tmp_path):
    bench = synthetic_benchmark(tmp_path, count=4)
    settings = EvalSettings(num_samples=2, temperature=1.0, prompt_type="boxed", batch_size=8, max_gen_tokens=16)
    evaluate(FakeEngine(), ByteTokenizer(), StringVerifier(), [bench], settings, out_dir=tmp_path / "run",
             identity={"checkpoint": "/a"})
    other = EvalSettings(num_samples=2, temperature=0.6, prompt_type="boxed", batch_size=8, max_gen_tokens=16)
    with pytest.raises(RunFolderMismatch, match=r"settings.temperature: recorded 1.0, now 0.6"):
        evaluate(FakeEngine(), ByteTokenizer(), StringVerifier(), [bench], other, out_dir=tmp_path / "run",
                 identity={"checkpoint": "/a"})
    with pytest.raises(RunFolderMismatch, match=r'identity.checkpoint: recorded "/a", now "/b"'):
        evaluate(FakeEngine(), ByteTokenizer(), StringVerifier(), [bench], settings, out_dir=tmp_path / "run",
                 identity={"checkpoint": "/b"})
    with pytest.raises(RunFolderMismatch, match=r"benchmarks.synthetic.num_problems: recorded 4, now 2"):
        evaluate(FakeEngine(), ByteTokenizer(), StringVerifier(), [load_benchmark(SYNTHETIC, bench.path, limit=2)],
                 settings, out_dir=tmp_path / "run", identity={"checkpoint": "/a"})


def test_vllm_engine_is_a_clear_error_when_unavailable():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(EngineNotAvailable, match="--engine vllm is not available"):
        open_engine("vllm", str(BUNDLED_WARMSTART), ByteTokenizer(), "float32", "cpu", 0)


# ---------------------------------------------------------------------------
# The command line, end to end on the bundled tiny checkpoint (real engine and sandboxed verifier)
# ---------------------------------------------------------------------------


def test_cli_evaluates_the_tiny_checkpoint_and_writes_samples_summaries_and_table(tmp_path, capsys):
    from areal_async.run.cli import main as cli_main

    bench_file = tmp_path / "synthetic20.jsonl"
    assert cli_main(["eval", "--write-synthetic", "20", str(bench_file)]) == 0
    argv = ["eval", str(BUNDLED_WARMSTART), "--benchmarks", f"synthetic={bench_file}", "--prompt-type", "boxed",
            "--num-samples", "2", "--temperature", "1.0", "--top-p", "1.0", "--max-gen-tokens", "16",
            "--output-dir", str(tmp_path / "out"), "--run-name", "tiny", "--no-progress", "--verifier-workers", "1"]
    assert cli_main(argv) == 0
    run = tmp_path / "out" / "tiny"
    samples = read_jsonl(run / "samples" / "synthetic.jsonl")
    assert len(samples) == 40
    assert set(samples[0]) >= {"problem_id", "sample_index", "response", "extracted_answer", "correct",
                               "num_tokens", "finish_reason"}
    summary = json.loads((run / "summary" / "synthetic.json").read_text())
    assert summary["pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / 40)
    assert summary["pass@1"] > 0.2  # the warm start is right a fair share of the time
    assert set(summary["pass@k"]) == {"1", "2"} and summary["pass@k"]["2"] >= summary["pass@1"]
    assert 0 < summary["mean_response_tokens"] <= 16 and 0 <= summary["truncated_fraction"] <= 1
    overall = json.loads((run / "summary.json").read_text())
    assert overall["checkpoints"]["arith-warmstart"]["benchmarks"]["synthetic"]["pass@1"] == summary["pass@1"]
    table = (run / "table.md").read_text().strip().splitlines()
    assert table[0] == "| checkpoint | Synthetic |"
    assert table[2] == f"| arith-warmstart | {100 * summary['pass@1']:.1f} ± {100 * summary['pass@1_stderr']:.1f} |"
    # the same command again resumes: nothing is generated, the results are the same
    assert cli_main(argv) == 0
    assert len(read_jsonl(run / "samples" / "synthetic.jsonl")) == 40
    assert json.loads((run / "summary" / "synthetic.json").read_text())["generated_this_call"] == 0
    capsys.readouterr()
    # a malformed benchmark fails with its file and line, before any model is loaded
    bench_file.write_text(bench_file.read_text() + "{oops\n")
    assert cli_main([a if a != "tiny" else "bad" for a in argv]) == 2
    assert f"{bench_file}:21: malformed JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The real benchmark files (../shared/data/eval), when present
# ---------------------------------------------------------------------------


@needs_eval_data
def test_real_benchmark_files_load_with_their_registered_fields():
    expected = {"math_500": 500, "aime24": 30, "amc23": 40, "gsm8k": 1319}
    for name, count in expected.items():
        spec = KNOWN_BENCHMARKS[name]
        bench = load_benchmark(spec, EVAL_DATA / spec.file)
        assert len(bench.problems) == count
    gsm8k = load_benchmark(KNOWN_BENCHMARKS["gsm8k"], EVAL_DATA / "gsm8k_test.jsonl")
    assert gsm8k.problems[0].text.startswith("Janet’s ducks") and gsm8k.problems[0].golds == ("18",)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.golds[0]) for p in gsm8k.problems)  # '####' text, commas gone
    amc = load_benchmark(KNOWN_BENCHMARKS["amc23"], EVAL_DATA / "amc23.jsonl")
    assert amc.problems[0].golds == ("27.0",)
    math500 = load_benchmark(KNOWN_BENCHMARKS["math_500"], EVAL_DATA / "math500.jsonl")
    assert math500.problems[0].problem_id.startswith("test/")


@needs_eval_data
def test_first_gsm8k_problems_through_evaluate_with_the_real_verifier(tmp_path):
    """A model that writes the gold of the GSM8K file in its own words: the real verifier must accept it."""
    from areal_async.reward import RewardVerifier

    bench = load_benchmark(KNOWN_BENCHMARKS["gsm8k"], EVAL_DATA / "gsm8k_test.jsonl", limit=5)
    lines = (EVAL_DATA / "gsm8k_test.jsonl").read_text().splitlines()[:5]
    finals = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in lines]

    class EchoGold:
        def generate(self, prompts, params):
            texts = [f"So the answer is \\boxed{{{finals[i % 5]}}}." for i in range(len(prompts))]
            return [Generation(list(t.encode()) + [EOS], [0.0] * (len(t) + 1), [0] * (len(t) + 1), "stop")
                    for t in texts]

    settings = EvalSettings(num_samples=1, prompt_type="none", batch_size=5, max_gen_tokens=64)
    with RewardVerifier(num_workers=1) as verifier:
        summary = evaluate(EchoGold(), ByteTokenizer(), verifier, [bench], settings)["gsm8k"]
    assert summary["pass@1"] == 1.0 and summary["num_problems"] == 5


def test_several_checkpoints_give_one_table_row_each(tmp_path, capsys):
    import shutil

    from evaluation.eval_and_aggregate import checkpoint_labels, main

    assert checkpoint_labels(["/x/a/final", "/x/b/final", "/x/c"]) == ["a-final", "b-final", "c"]
    other = tmp_path / "other"
    shutil.copytree(BUNDLED_WARMSTART, other)
    bench_file = write_synthetic_benchmark(tmp_path / "s.jsonl", 5)
    argv = [str(BUNDLED_WARMSTART), str(other), "--benchmarks", f"synthetic={bench_file}", "--prompt-type", "boxed",
            "--num-samples", "1", "--temperature", "0", "--max-gen-tokens", "16", "--output-dir", str(tmp_path),
            "--run-name", "two", "--no-progress", "--verifier-workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    run = tmp_path / "two"
    table = (run / "table.md").read_text().strip().splitlines()
    assert [line.split(" | ")[0] for line in table[2:4]] == ["| arith-warmstart", "| other"]
    assert table[2].split(" | ")[1] == table[3].split(" | ")[1]  # same weights, greedy: same accuracy
    for label in ("arith-warmstart", "other"):
        assert len(read_jsonl(run / label / "samples" / "synthetic.jsonl")) == 5
        assert (run / label / "summary" / "synthetic.json").is_file()
    assert set(json.loads((run / "summary.json").read_text())["checkpoints"]) == {"arith-warmstart", "other"}
