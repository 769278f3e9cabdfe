"""Tests for the prompt-file loaders in areal_async.data.loaders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from areal_async.config import DataConfig, DataKind
from areal_async.data import load_train_and_heldout
from areal_async.data.loaders import (
    load_areal_jsonl,
    load_areal_prompts,
    load_jsonl,
    load_prompts,
)
from areal_async.data.records import DatasetError, PromptRecord
from areal_async.config import PromptType
from areal_async.prompts import PROMPT_FORMATS

DEEPSCALER_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{}."
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    """Write each row as one JSON line; a row that is already a str is written verbatim."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    """Write ``value`` as one JSON document."""
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def areal_row(query_id="q1", prompt="What is 1+1?", solutions=("\\boxed{2}",), **extra) -> dict:
    """One record of AReaL's joined format."""
    return {"query_id": query_id, "prompt": prompt, "solutions": list(solutions), **extra}


# ---------------------------------------------------------------------------
# DatasetError
# ---------------------------------------------------------------------------


def test_dataset_error_message_and_attributes():
    error = DatasetError("prompts.jsonl", 17, "missing key 'prompt'")
    assert str(error) == "prompts.jsonl:17: missing key 'prompt'"
    assert (error.path, error.line) == (Path("prompts.jsonl"), 17)
    assert isinstance(error, ValueError)


def test_dataset_error_survives_pickling():
    restored = pickle.loads(pickle.dumps(DatasetError("a.jsonl", 3, "bad")))
    assert (str(restored), restored.path, restored.line) == ("a.jsonl:3: bad", Path("a.jsonl"), 3)


# ---------------------------------------------------------------------------
# AReaL joined format
# ---------------------------------------------------------------------------


def test_areal_jsonl_reads_records(tmp_path):
    path = write_jsonl(tmp_path / "joined.jsonl", [
        areal_row("a", "P1", ["\\boxed{1}", "1"], task="stem"),
        "",
        areal_row(7, "P2", ["\\boxed{2}"]),
    ])
    assert load_areal_jsonl(path) == [
        PromptRecord("a", "P1", ("\\boxed{1}", "1"), "stem"),
        PromptRecord("7", "P2", ("\\boxed{2}",), "math"),
    ]


@pytest.mark.parametrize("missing_key", ["query_id", "prompt", "solutions"])
def test_areal_jsonl_missing_key_names_key_and_line(tmp_path, missing_key):
    bad_row = areal_row("b")
    del bad_row[missing_key]
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row("a"), bad_row])
    with pytest.raises(DatasetError, match=f"joined.jsonl:2: missing key '{missing_key}'") as info:
        load_areal_jsonl(path)
    assert (info.value.path, info.value.line) == (path, 2)


def test_areal_jsonl_rejects_unknown_task(tmp_path):
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row(task="poetry")])
    with pytest.raises(DatasetError, match=r"joined.jsonl:1: key 'task' must be one of 'math', 'stem', 'code'"):
        load_areal_jsonl(path)


@pytest.mark.parametrize("solutions", [[], "\\boxed{2}", [2], None])
def test_areal_jsonl_rejects_bad_solutions(tmp_path, solutions):
    path = write_jsonl(tmp_path / "joined.jsonl", [{"query_id": "a", "prompt": "P", "solutions": solutions}])
    with pytest.raises(DatasetError, match="key 'solutions' must be a non-empty list of strings"):
        load_areal_jsonl(path)


@pytest.mark.parametrize("query_id", ["", True, 1.5, None])
def test_areal_jsonl_rejects_bad_query_id(tmp_path, query_id):
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row(query_id)])
    with pytest.raises(DatasetError, match="key 'query_id' must be a non-empty string or an integer"):
        load_areal_jsonl(path)


# ---------------------------------------------------------------------------
# Errors common to all JSONL loaders
# ---------------------------------------------------------------------------


def test_malformed_line_reports_its_line_number(tmp_path):
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row("a"), "", '{"query_id": "b", "prompt": '])
    with pytest.raises(DatasetError, match=r"joined.jsonl:3: malformed JSON: Expecting value") as info:
        load_areal_jsonl(path)
    assert info.value.line == 3


def test_non_object_line_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row("a"), "[1, 2]"])
    with pytest.raises(DatasetError, match="joined.jsonl:2: expected a JSON object, got array"):
        load_areal_jsonl(path)


def test_invalid_utf8_reports_line(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_bytes(json.dumps(areal_row("a")).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match="joined.jsonl:2: not valid UTF-8"):
        load_areal_jsonl(path)


def test_non_ascii_text_is_read_as_utf8(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_text('{"query_id": "a", "prompt": "Janet’s ducks: π", "solutions": ["18"]}\n', encoding="utf-8")
    assert load_areal_jsonl(path)[0].prompt == "Janet’s ducks: π"


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_file_without_records_is_rejected(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match="empty.jsonl: the file had no records") as info:
        load_areal_jsonl(path)
    assert info.value.line is None


def test_duplicate_query_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row("a"), areal_row("b"), areal_row("a")])
    with pytest.raises(DatasetError, match=r"joined.jsonl:3: duplicate query_id 'a' \(first on line 1, again on line 3\)"):
        load_areal_jsonl(path)


def test_duplicate_detection_treats_int_and_str_ids_alike(tmp_path):
    path = write_jsonl(tmp_path / "joined.jsonl", [areal_row(5), areal_row("5")])
    with pytest.raises(DatasetError, match="duplicate query_id '5'"):
        load_areal_jsonl(path)


@pytest.mark.parametrize("loader", [load_areal_jsonl, load_jsonl])
def test_missing_file_raises_file_not_found_naming_path(tmp_path, loader):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as info:
        loader(missing)
    assert info.value.filename == str(missing)


# ---------------------------------------------------------------------------
# AReaL prompts + id2info pair
# ---------------------------------------------------------------------------


def test_areal_prompts_joins_solutions_from_id2info(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"query_id": "a", "prompt": "P1"},
        {"query_id": 2, "prompt": "P2", "task": "stem"},
    ])
    id2info = write_json(tmp_path / "id2info.json", {
        "a": {"solutions": ["\\boxed{1}"], "type": "math"},
        "2": {"solutions": ["\\boxed{2}", "2"]},
        "unused": {"solutions": ["\\boxed{3}"]},
    })
    assert load_areal_prompts(prompts, id2info) == [
        PromptRecord("a", "P1", ("\\boxed{1}",)),
        PromptRecord("2", "P2", ("\\boxed{2}", "2"), "stem"),
    ]


def test_areal_prompts_id_missing_from_id2info_names_file_line_and_id(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"query_id": "a", "prompt": "P1"},
        {"query_id": "ghost", "prompt": "P2"},
    ])
    id2info = write_json(tmp_path / "id2info.json", {"a": {"solutions": ["1"]}})
    with pytest.raises(DatasetError, match="prompts.jsonl:2: query_id 'ghost' not found in .*id2info.json"):
        load_areal_prompts(prompts, id2info)


@pytest.mark.parametrize("info, reason", [
    ({}, "missing key 'solutions'"),
    ({"solutions": []}, "key 'solutions' must be a non-empty list of strings"),
    ({"solutions": "1"}, "key 'solutions' must be a non-empty list of strings"),
    (["1"], "expected a JSON object, got array"),
])
def test_areal_prompts_rejects_bad_id2info_entry(tmp_path, info, reason):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query_id": "a", "prompt": "P1"}])
    id2info = write_json(tmp_path / "id2info.json", {"a": info})
    with pytest.raises(DatasetError, match=f"id2info.json: entry 'a': {reason}"):
        load_areal_prompts(prompts, id2info)


def test_areal_prompts_malformed_id2info_reports_line(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query_id": "a", "prompt": "P1"}])
    id2info = tmp_path / "id2info.json"
    id2info.write_text('{\n "a": {"solutions": ["1"]},\n}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="id2info.json:3: malformed JSON"):
        load_areal_prompts(prompts, id2info)


def test_areal_prompts_id2info_must_be_an_object(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query_id": "a", "prompt": "P1"}])
    id2info = write_json(tmp_path / "id2info.json", [{"solutions": ["1"]}])
    with pytest.raises(DatasetError, match="id2info.json: expected one JSON object, got array"):
        load_areal_prompts(prompts, id2info)


def test_areal_prompts_missing_id2info_raises_file_not_found(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query_id": "a", "prompt": "P1"}])
    with pytest.raises(FileNotFoundError, match="id2info.json"):
        load_areal_prompts(prompts, tmp_path / "id2info.json")


def test_areal_prompts_missing_prompt_key(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query_id": "a", "prompt": "P1"}, {"query_id": "b"}])
    id2info = write_json(tmp_path / "id2info.json", {"a": {"solutions": ["1"]}, "b": {"solutions": ["2"]}})
    with pytest.raises(DatasetError, match="prompts.jsonl:2: missing key 'prompt'"):
        load_areal_prompts(prompts, id2info)


# ---------------------------------------------------------------------------
# Generic JSONL loader
# ---------------------------------------------------------------------------


def test_generic_uses_first_present_keys_and_line_based_ids(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"problem": "P1", "question": "ignored", "answer": "\\frac{1}{2}", "solution": "ignored"},
        "",
        {"question": "P3", "solutions": ["4", "\\boxed{4}"]},
        {"prompt": "P4", "problem": "ignored", "solution": "worked \\boxed{5}"},
    ])
    assert load_jsonl(path) == [
        PromptRecord("mixed-1", "P1", ("\\frac{1}{2}",)),
        PromptRecord("mixed-3", "P3", ("4", "\\boxed{4}")),
        PromptRecord("mixed-4", "P4", ("worked \\boxed{5}",)),
    ]


def test_generic_gsm8k_final_answer_without_thousands_commas(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Q1", "answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18"},
        {"question": "Q2", "answer": "Total is 1,450,000.\n#### 1,450,000\n"},
        {"question": "Q3", "answer": "#### -2,125"},
        {"question": "Q4", "answer": "The value 1,234 has no final marker"},
    ])
    answers = [record.solutions for record in load_jsonl(path)]
    assert answers == [("18",), ("1450000",), ("-2125",), ("The value 1,234 has no final marker",)]


def test_generic_numeric_answers_keep_their_spelling(tmp_path):
    path = write_jsonl(tmp_path / "amc.jsonl", [
        {"id": 0, "problem": "P0", "answer": 27.0},
        {"id": 4, "problem": "P4", "answer": 3159.0},
        {"id": 9, "problem": "P9", "answer": 12},
    ])
    records = load_jsonl(path, id_key="id")
    assert [(r.query_id, r.solutions) for r in records] == [("0", ("27.0",)), ("4", ("3159.0",)), ("9", ("12",))]


@pytest.mark.parametrize("answer", [True, None, [], [1], {"value": 1}])
def test_generic_rejects_unusable_answers(tmp_path, answer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "P", "answer": answer}])
    with pytest.raises(DatasetError, match="bad.jsonl:1: key 'answer' must be a string, a number or a non-empty list"):
        load_jsonl(path)


def test_generic_template_is_applied_without_touching_other_braces(tmp_path):
    path = write_jsonl(tmp_path / "ds.jsonl", [{"problem": "Find $x^{2}$ if $x=3$.", "answer": "9"}])
    (record,) = load_jsonl(path, template=DEEPSCALER_TEMPLATE)
    assert record.prompt == (
        "Find $x^{2}$ if $x=3$. Let's think step by step and output the final answer within \\boxed{}."
    )


@pytest.mark.parametrize("template", ["no placeholder", "{question} only", 42])
def test_generic_rejects_template_without_placeholder(tmp_path, template):
    path = write_jsonl(tmp_path / "ds.jsonl", [{"problem": "P", "answer": "1"}])
    with pytest.raises(ValueError, match="template must be a string containing '{problem}'"):
        load_jsonl(path, template=template)


def test_generic_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"uid": "x1", "text": "P", "gold": "7"}])
    records = load_jsonl(path, prompt_keys=("text",), answer_keys=("gold",), id_key="uid")
    assert records == [PromptRecord("x1", "P", ("7",))]


@pytest.mark.parametrize("row, reason", [
    ({"answer": "1"}, "missing prompt key: none of 'prompt', 'problem', 'question' is present"),
    ({"problem": "P"}, "missing answer key: none of 'answer', 'solution', 'solutions' is present"),
    ({"problem": "   ", "answer": "1"}, "key 'problem' must be a non-empty string"),
])
def test_generic_reports_missing_or_empty_fields(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "g.jsonl", [{"problem": "ok", "answer": "1"}, row])
    with pytest.raises(DatasetError, match=f"g.jsonl:2: {reason}"):
        load_jsonl(path)


def test_generic_id_key_errors(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"id": 1, "problem": "P", "answer": "1"}, {"problem": "Q", "answer": "2"}])
    with pytest.raises(DatasetError, match="g.jsonl:2: missing key 'id'"):
        load_jsonl(path, id_key="id")
    duplicated = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "problem": "P", "answer": "1"}] * 2)
    with pytest.raises(DatasetError, match=r"d.jsonl:2: duplicate query_id '1' \(first on line 1"):
        load_jsonl(duplicated, id_key="id")


# ---------------------------------------------------------------------------
# load_prompts dispatch
# ---------------------------------------------------------------------------


def test_load_prompts_dispatches_by_kind(tmp_path):
    joined = write_jsonl(tmp_path / "joined.jsonl", [areal_row("a")])
    generic = write_jsonl(tmp_path / "g.jsonl", [{"problem": "P", "answer": "1"}])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query_id": "a", "prompt": "What is 1+1?"}])
    id2info = write_json(tmp_path / "id2info.json", {"a": {"solutions": ["\\boxed{2}"]}})
    assert load_prompts("areal_jsonl", path=joined) == load_areal_jsonl(joined)
    assert load_prompts("areal_prompts", prompts_path=prompts, id2info_path=id2info) == load_areal_jsonl(joined)
    assert load_prompts("jsonl", path=generic, template="Q: {problem}")[0].prompt == "Q: P"


def test_load_prompts_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="unknown prompt file kind 'csv'; valid kinds are 'areal_prompts', 'areal_jsonl', 'jsonl'"):
        load_prompts("csv", path="x.csv")


# ---------------------------------------------------------------------------
# Real data files (shared/data next to the repository), if present
# ---------------------------------------------------------------------------

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")


@needs_shared_data
@pytest.mark.parametrize("relative_path, count, first_answer", [
    ("train/deepscaler_aime_1983_2023.jsonl", 975, "60"),
    ("train/deepscaler_math_train_every8th.jsonl", 935, "0"),
    ("eval/gsm8k_test.jsonl", 1319, "18"),
    ("eval/math500.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("eval/amc23.jsonl", 40, "27.0"),
    ("eval/aime24.jsonl", 30, "204"),
])
def test_real_files_load_with_generic_loader(relative_path, count, first_answer):
    path = SHARED_DATA / relative_path
    records = load_jsonl(path)
    assert len(records) == count
    assert records[0].solutions == (first_answer,)
    assert records[0].query_id == f"{path.stem}-1"
    assert all(record.task == "math" and record.prompt.strip() for record in records)


@needs_shared_data
def test_real_gsm8k_answers_are_plain_numbers():
    records = load_jsonl(SHARED_DATA / "eval/gsm8k_test.jsonl")
    assert records[0].prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert records[146].solutions == ("2125",)  # "#### 2,125" on line 147
    assert all(record.solutions[0].lstrip("-").replace(".", "", 1).isdigit() for record in records)


@needs_shared_data
def test_real_amc23_ids_and_aime24_leading_zeros():
    amc = load_jsonl(SHARED_DATA / "eval/amc23.jsonl", id_key="id")
    assert amc[0].query_id == "0" and len({record.query_id for record in amc}) == 40
    aime24 = load_jsonl(SHARED_DATA / "eval/aime24.jsonl", id_key="id")
    assert aime24[0].query_id == "60"
    assert any(record.solutions[0].startswith("0") for record in aime24)  # e.g. "025": compare numerically


@needs_shared_data
def test_real_math_train_has_one_empty_gold_answer():
    """Line 667 of the MATH sample has an empty ``answer`` in the source; the loader keeps it."""
    records = load_jsonl(SHARED_DATA / "train/deepscaler_math_train_every8th.jsonl")
    assert [record.query_id for record in records if record.solutions == ("",)] == [
        "deepscaler_math_train_every8th-667"
    ]


@needs_shared_data
def test_deepscaler_converted_to_both_areal_formats_reads_back_identically(tmp_path):
    source = load_jsonl(SHARED_DATA / "train/deepscaler_aime_1983_2023.jsonl", template=DEEPSCALER_TEMPLATE)[:5]
    joined_rows = [
        {"prompt": r.prompt, "task": "math", "query_id": f"aime-{i}", "solutions": ["\\boxed{" + r.solutions[0] + "}"]}
        for i, r in enumerate(source)
    ]
    joined = write_jsonl(tmp_path / "joined.jsonl", joined_rows)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "query_id": r["query_id"]} for r in joined_rows])
    id2info = write_json(tmp_path / "id2info.json", {r["query_id"]: {"solutions": r["solutions"]} for r in joined_rows})

    from_joined = load_areal_jsonl(joined)
    assert from_joined == load_areal_prompts(prompts, id2info)
    assert from_joined[0].solutions == ("\\boxed{60}",)
    assert from_joined[0].prompt.endswith("Find $\\log_z w$. Let's think step by step and output the final answer within \\boxed{}.")
    assert [r.prompt for r in from_joined] == [r.prompt for r in source]


def test_prompt_type_templates_every_kind_of_file_once(tmp_path):
    orz = PROMPT_FORMATS[PromptType.orz]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"query_id": "a", "prompt": "What is 1+1?"},
                                                  {"query_id": "b", "prompt": orz.render("What is 2+2?")}])
    id2info = write_json(tmp_path / "id2info.json", {"a": {"solutions": ["\\boxed{2}"]}, "b": {"solutions": ["4"]}})
    config = DataConfig(kind=DataKind.areal_prompts, path=str(prompts), id2info_path=str(id2info),
                        prompt_type=PromptType.orz, num_heldout=0)
    train, heldout = load_train_and_heldout(config)
    # the plain prompt gets the template; the one written with it already is left as it is
    assert sorted(r.prompt for r in train) == sorted([orz.render("What is 1+1?"), orz.render("What is 2+2?")])
    assert heldout == []
    generic = write_jsonl(tmp_path / "g.jsonl", [{"problem": "P", "answer": "1"}])
    own = DataConfig(kind=DataKind.jsonl, path=str(generic), prompt_template="{problem} Box it.", num_heldout=0)
    assert [r.prompt for r in load_train_and_heldout(own)[0]] == ["P Box it."]


def test_bad_prompt_settings_fail_when_the_config_is_made():
    with pytest.raises(ValueError, match="not both"):
        DataConfig(prompt_type=PromptType.orz, prompt_template="{problem}!")
    from areal_async.run.cli import compose_config

    with pytest.raises(Exception, match="chatml"):
        compose_config("train", ["data.prompt_type=chatml"])


def test_synthetic_prompts_take_no_template():
    with pytest.raises(ValueError, match="data.kind=synthetic writes its own prompts"):
        load_train_and_heldout(DataConfig(prompt_type=PromptType.boxed))
