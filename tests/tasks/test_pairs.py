"""The pair format: JSONL round trip, one-line errors naming file/line/field, tokenizer checks and filtering."""

from __future__ import annotations

import json

import pytest
from conftest import word_tokenizer

from neurontrace.errors import DatasetError, NeurontraceError, TokenizationError
from neurontrace.tasks import Pair, check_pairs, filter_pairs, load_pairs, save_pairs

TOK = word_tokenizer()

KEYS = Pair("the keys to the cabinet", "the key to the cabinet", " are", " is", "plural_singular")
DOGS = Pair("the dog near the tables", "the dogs near the tables", " runs", " run")
LINE = {"clean_prefix": "the keys", "patch_prefix": "the key", "clean_answer": " are", "patch_answer": " is"}


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ files


def test_round_trip_keeps_every_field_and_the_order(tmp_path):
    pairs = [KEYS, DOGS, Pair("Die Schlüssel", "Der Schlüssel", " sind", " ist", "plural")]
    path = save_pairs(tmp_path / "sub" / "pairs.jsonl", pairs)
    assert path == tmp_path / "sub" / "pairs.jsonl"
    assert load_pairs(path) == pairs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {
        "clean_prefix": "the keys to the cabinet",
        "patch_prefix": "the key to the cabinet",
        "clean_answer": " are",
        "patch_answer": " is",
        "case": "plural_singular",
    }
    assert "case" not in json.loads(lines[1])  # no case, no key
    assert "Schlüssel" in lines[2]  # written as UTF-8 text, not escaped
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary file left


def test_save_replaces_an_existing_file(tmp_path):
    path = save_pairs(tmp_path / "p.jsonl", [KEYS, DOGS])
    save_pairs(path, [DOGS])
    assert load_pairs(path) == [DOGS]


def test_save_refuses_an_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="no pairs to write"):
        save_pairs(tmp_path / "p.jsonl", [])
    assert not (tmp_path / "p.jsonl").exists()


def test_load_ignores_blank_lines_and_unknown_keys(tmp_path):
    path = write_lines(tmp_path, json.dumps({**LINE, "source": "marks", "case": "plural"}), "", "   ")
    assert load_pairs(path) == [Pair("the keys", "the key", " are", " is", "plural")]


def test_load_accepts_a_null_case(tmp_path):
    path = write_lines(tmp_path, json.dumps({**LINE, "case": None}))
    assert load_pairs(path)[0].case is None


def test_bad_json_names_its_line(tmp_path):
    path = write_lines(tmp_path, json.dumps(LINE), json.dumps(LINE), '{"clean_prefix": "the keys",')
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:3: invalid JSON") as info:
        load_pairs(path)
    assert "\n" not in str(info.value)


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path, json.dumps(LINE), "", "not json")
    with pytest.raises(DatasetError, match=r":3: invalid JSON"):
        load_pairs(path)


def test_missing_field_is_named(tmp_path):
    bad = {k: v for k, v in LINE.items() if k != "patch_answer"}
    path = write_lines(tmp_path, json.dumps(LINE), json.dumps(bad))
    with pytest.raises(DatasetError, match=r":2: missing field 'patch_answer'"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [("clean_answer", 5, "int"), ("patch_prefix", "", "''"), ("clean_prefix", None, "NoneType")],
)
def test_field_must_be_a_non_empty_string(tmp_path, field, value, shown):
    path = write_lines(tmp_path, json.dumps({**LINE, field: value}))
    with pytest.raises(DatasetError, match=rf":1: field '{field}' must be a non-empty string, got {shown}"):
        load_pairs(path)


def test_case_must_be_a_string(tmp_path):
    path = write_lines(tmp_path, json.dumps({**LINE, "case": 3}))
    with pytest.raises(DatasetError, match=r":1: field 'case' must be a string"):
        load_pairs(path)


def test_a_line_must_be_an_object(tmp_path):
    path = write_lines(tmp_path, json.dumps(LINE), json.dumps([LINE]))
    with pytest.raises(DatasetError, match=r":2: expected a JSON object, got list"):
        load_pairs(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DatasetError, match=r"empty\.jsonl is empty"):
        load_pairs(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"no such dataset file: .*nope\.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="is a folder"):
        load_pairs(tmp_path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"clean_prefix": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_pairs(path)


def test_dataset_errors_are_user_errors():
    assert issubclass(DatasetError, NeurontraceError) and issubclass(DatasetError, ValueError)


# ------------------------------------------------------------- tokenizer


def test_check_pairs_accepts_single_token_answers_and_equal_lengths():
    check_pairs([KEYS, DOGS], TOK)


def test_check_pairs_names_the_pair_with_a_multi_token_answer():
    # The whitespace tokenizer splits punctuation: "cabinet's" is three tokens.
    bad = Pair("the keys", "the key", " are", " cabinet's")
    with pytest.raises(
        TokenizationError, match=r"pair 1: patch_answer: answer \" cabinet's\" must be one token"
    ):
        check_pairs([KEYS, bad], TOK)


def test_check_pairs_names_the_pair_with_unequal_lengths():
    bad = Pair("the keys to the cabinet", "the key to cabinet", " are", " is")
    with pytest.raises(TokenizationError, match=r"pair 2 has unequal token lengths: .* is 5 tokens, .* is 4"):
        check_pairs([KEYS, DOGS, bad], TOK)
    check_pairs([KEYS, DOGS, bad], TOK, same_length=False)


def test_check_pairs_needs_pairs():
    with pytest.raises(DatasetError, match="no pairs"):
        check_pairs([], TOK)


def test_filter_pairs_drops_bad_pairs_and_keeps_the_order():
    two_word = Pair("the keys", "the key", " are", " is")
    multi_answer = Pair("the keys", "the key", " are", " is.")
    unequal = Pair("the keys to the cabinet", "the key", " are", " is")
    pairs = [DOGS, multi_answer, two_word, unequal, KEYS]
    assert filter_pairs(pairs, TOK, one_length=False) == [DOGS, two_word, KEYS]
    # Lengths 5, 2, 5: the most common length (5) wins.
    assert filter_pairs(pairs, TOK) == [DOGS, KEYS]


def test_filter_pairs_breaks_length_ties_towards_the_shortest():
    two_word = Pair("the keys", "the key", " are", " is")
    assert filter_pairs([KEYS, two_word], TOK) == [two_word]
    assert filter_pairs([], TOK) == []
