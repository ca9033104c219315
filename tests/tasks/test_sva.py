"""Subject-verb agreement generators: grammatical by construction, balanced, deterministic; the default model's
tokenizer keeps enough aligned pairs, and the default model gets most of them right."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import word_tokenizer

from neurontrace.errors import DatasetError, NeurontraceError
from neurontrace.tasks import (
    SVA_TASKS,
    Pair,
    check_pairs,
    generate_sva,
    load_pairs,
    sva,
    train_test_split,
    write_sva,
)
from neurontrace.tokens import encode, single_token_id

# word -> (lemma, number) over every noun and verb of the generators' word lists.
LEXICON: dict[str, tuple[str, str]] = {}
for pairs in (
    sva.SUBJECT_NOUNS,
    sva.EMBEDDED_NOUNS,
    sva.OBJECT_NOUNS,
    sva.TRANSITIVE_VERBS,
    sva.AGREEING_VERBS,
):
    for singular, plural in pairs:
        LEXICON[singular.strip()] = (singular.strip(), "singular")
        LEXICON[plural.strip()] = (singular.strip(), "plural")

# For each task: the words of its template, the index of the noun the answer agrees with, the index of the noun
# the patch flips, the indices whose numbers make the case, and (for rc) the embedded verb and its noun.
TEMPLATES = {
    "simple": dict(words=["The", "N"], agree=1, flip=1, case=(1,), inner=None),
    "nounpp": dict(words=["The", "N", "P", "the", "N"], agree=1, flip=1, case=(1, 4), inner=None),
    "rc": dict(words=["The", "N", "that", "the", "N", "V"], agree=1, flip=1, case=(1, 4), inner=(4, 5)),
    "within_rc": dict(words=["The", "N", "that", "the", "N"], agree=4, flip=4, case=(1, 4), inner=None),
    "pp_mixed": dict(words=["The", "N", "P", "the", "N"], agree=1, flip=1, case=(1, 4), inner=None),
}


def words(prompt: str) -> list[str]:
    """The template words of a prompt: a multi-word preposition ("next to") is one word ("next_to")."""
    for prep in sva.MIXED_PREPOSITIONS:
        prompt = prompt.replace(f" {prep} ", f" {prep.replace(' ', '_')} ")
    return prompt.split()


def number(word: str) -> str:
    return LEXICON[word.strip()][1]


def lemma(word: str) -> str:
    return LEXICON[word.strip()][0]


def test_word_lists_are_consistent():
    nouns = [*sva.SUBJECT_NOUNS, *sva.EMBEDDED_NOUNS, *sva.OBJECT_NOUNS]
    assert len(sva.SUBJECT_NOUNS) >= 30 and len(nouns) >= 60
    assert len({w for pair in nouns for w in pair}) == 2 * len(nouns)  # no word in two places
    assert not {s for s, _ in sva.SUBJECT_NOUNS} & {s for s, _ in sva.EMBEDDED_NOUNS}
    assert ("author", "authors") in sva.SUBJECT_NOUNS and ("box", "boxes") in sva.OBJECT_NOUNS
    assert ("coach", "coaches") in sva.EMBEDDED_NOUNS
    assert all(s == p + "s" for s, p in sva.TRANSITIVE_VERBS)  # likes/like: the singular has the -s
    assert sva.AGREEING_VERBS == ((" is", " are"), (" has", " have"), (" does", " do"), (" goes", " go"))
    assert set(sva.PREPOSITIONS) <= {"near", "behind", "beside", "by", "under", "outside", "above", "inside"}


@pytest.mark.parametrize("task", SVA_TASKS)
def test_pairs_are_grammatical_by_construction(task):
    spec = TEMPLATES[task]
    pairs = generate_sva(task, n=2000 if task != "simple" else None, seed=1)
    assert len(pairs) == len(set(pairs))
    for p in pairs:
        clean, patch = words(p.clean_prefix), words(p.patch_prefix)
        assert len(clean) == len(patch) == len(spec["words"])
        for i, slot in enumerate(spec["words"]):
            if slot == "P":
                preps = sva.MIXED_PREPOSITIONS if task == "pp_mixed" else sva.PREPOSITIONS
                assert clean[i].replace("_", " ") in preps
            elif slot not in ("N", "V"):
                assert clean[i] == slot
        # The answers are the two forms of one verb; the clean one agrees with the right noun.
        assert lemma(p.clean_answer) == lemma(p.patch_answer)
        assert number(p.clean_answer) == number(clean[spec["agree"]])
        assert number(p.patch_answer) == number(patch[spec["agree"]]) != number(p.clean_answer)
        # The patch flips exactly one noun's number and changes nothing else.
        f = spec["flip"]
        assert [w for i, w in enumerate(clean) if i != f] == [w for i, w in enumerate(patch) if i != f]
        assert lemma(clean[f]) == lemma(patch[f]) and clean[f] != patch[f]
        assert p.case == "_".join(number(clean[i]) for i in spec["case"])
        if spec["inner"]:  # the embedded verb agrees with the embedded noun, in both prompts
            noun, verb = spec["inner"]
            assert number(clean[verb]) == number(clean[noun]) and number(patch[verb]) == number(patch[noun])


def test_examples_read_as_expected():
    # Independent of the word lists: a few prompts checked by eye.
    simple = generate_sva("simple", seed=0)
    assert Pair("The authors", "The author", " are", " is", "plural") in simple
    assert Pair("The author", "The authors", " goes", " go", "singular") in simple
    found = [p for p in generate_sva("within_rc", seed=0) if p.clean_prefix == "The pilots that the editors"]
    assert found
    for p in found:
        assert p.patch_prefix == "The pilots that the editor" and p.case == "plural_plural"
        assert (p.clean_answer, p.patch_answer) in [
            (" are", " is"),
            (" have", " has"),
            (" do", " does"),
            (" go", " goes"),
        ]
    found = [
        p for p in generate_sva("rc", seed=0) if p.clean_prefix.startswith("The authors that the editor ")
    ]
    assert found
    for p in found:
        assert p.patch_prefix == p.clean_prefix.replace("authors", "author") and p.case == "plural_singular"
        assert p.clean_answer in (" are", " have", " do", " go")
        assert p.clean_prefix.split()[-1] in (
            "likes",
            "knows",
            "loves",
            "helps",
            "trusts",
            "meets",
            "visits",
            "calls",
        )


@pytest.mark.parametrize("task", SVA_TASKS)
def test_deterministic_for_a_seed_and_different_across_seeds(task):
    a = generate_sva(task, n=100, seed=7)
    assert a == generate_sva(task, n=100, seed=7)
    b = generate_sva(task, n=100, seed=8)
    assert a != b and set(a) != set(b)


@pytest.mark.parametrize("task", SVA_TASKS)
def test_cases_are_balanced(task):
    counts = Counter(p.case for p in generate_sva(task, n=102, seed=0))
    n_cases = 2 if task == "simple" else 4
    assert len(counts) == n_cases and sum(counts.values()) == 102
    assert max(counts.values()) - min(counts.values()) <= 1
    full = Counter(p.case for p in generate_sva(task, seed=0))
    assert len(set(full.values())) == 1  # all of them: exactly balanced


def test_sizes_without_n():
    assert len(generate_sva("simple")) == len(sva.SUBJECT_NOUNS) * 2 * len(sva.AGREEING_VERBS)
    assert len(generate_sva("within_rc")) == sva.MAX_PAIRS  # 10240 combinations, capped
    assert len(generate_sva("nounpp")) == sva.MAX_PAIRS


def test_shuffled_so_cases_interleave():
    first = [p.case for p in generate_sva("nounpp", n=40, seed=0)[:12]]
    assert len(set(first)) > 1


def test_bad_requests():
    with pytest.raises(
        NeurontraceError, match="unknown SVA task 'agreement'; choose one of simple, nounpp, rc"
    ):
        generate_sva("agreement")
    with pytest.raises(NeurontraceError, match="n must be a positive number"):
        generate_sva("simple", n=0)
    with pytest.raises(DatasetError, match=r"simple has only 256 pairs .*; ask for n <= 256"):
        generate_sva("simple", n=1000)


def test_a_tokenizer_that_keeps_every_word_whole_changes_nothing():
    # The conftest tokenizer maps each word (unknown ones to [UNK]) to one token, so nothing is filtered.
    for task in SVA_TASKS:
        assert generate_sva(task, n=60, seed=2, tokenizer=word_tokenizer()) == generate_sva(
            task, n=60, seed=2
        )


def test_train_test_split_is_a_stratified_partition():
    pairs = generate_sva("nounpp", n=400, seed=0)
    train, test = train_test_split(pairs, test_fraction=0.25, seed=3)
    assert len(test) == 100 and len(train) == 300
    assert set(train) | set(test) == set(pairs) and not set(train) & set(test)
    assert Counter(p.case for p in test) == {c: 25 for c in Counter(p.case for p in pairs)}
    assert (train, test) == train_test_split(pairs, test_fraction=0.25, seed=3)
    assert test != train_test_split(pairs, test_fraction=0.25, seed=4)[1]


def test_train_test_split_refuses_an_empty_side():
    with pytest.raises(DatasetError, match="empty test set"):
        train_test_split(generate_sva("simple", n=2), test_fraction=0.2)
    with pytest.raises(NeurontraceError, match="test_fraction must be between 0 and 1"):
        train_test_split(generate_sva("simple", n=10), test_fraction=1.0)


def test_write_sva(tmp_path):
    train_path, test_path = write_sva(
        "within_rc", tmp_path / "data", n=200, seed=5, tokenizer=word_tokenizer()
    )
    assert (train_path.name, test_path.name) == ("within_rc_train.jsonl", "within_rc_test.jsonl")
    train, test = load_pairs(train_path), load_pairs(test_path)
    assert (len(train), len(test)) == (160, 40)
    assert (train, test) == train_test_split(generate_sva("within_rc", n=200, seed=5), seed=5)


# --------------------------------------------------------- default model


@pytest.mark.default_model
@pytest.mark.parametrize("task", SVA_TASKS)
def test_default_tokenizer_keeps_aligned_single_token_pairs(default_model, task):
    tok = default_model.tokenizer
    pairs = generate_sva(task, seed=0, tokenizer=tok)
    check_pairs(pairs, tok)
    lengths = set()
    for p in pairs:
        single_token_id(tok, p.clean_answer), single_token_id(tok, p.patch_answer)
        n_clean, n_patch = len(encode(tok, p.clean_prefix)), len(encode(tok, p.patch_prefix))
        assert n_clean == n_patch
        lengths.add(n_clean)
    if task in sva.MIXED_LENGTH_TASKS:  # several lengths by design: one-, two- and three-word prepositions
        assert len(lengths) >= 3
    else:
        assert len(lengths) == 1
    assert len(pairs) >= (100 if task in ("nounpp", "within_rc", "pp_mixed") else 50)


@pytest.mark.default_model
@pytest.mark.parametrize("task", ["simple", "nounpp"])
def test_default_model_prefers_the_clean_answer(default_model, task):
    pairs = generate_sva(task, n=50, seed=0, tokenizer=default_model.tokenizer)
    with torch.no_grad():
        logits = default_model.logits(default_model.tokenize([p.clean_prefix for p in pairs]))[:, -1]
    clean = torch.tensor([single_token_id(default_model, p.clean_answer) for p in pairs])
    patch = torch.tensor([single_token_id(default_model, p.patch_answer) for p in pairs])
    rows = torch.arange(len(pairs))
    accuracy = (logits[rows, clean] > logits[rows, patch]).float().mean().item()
    assert accuracy > 0.7, f"{task}: the default model prefers the clean answer on only {accuracy:.0%}"
