"""Tokenisation helpers: padding bookkeeping, single-token answers, equal-length pairs, neuron ids."""

from __future__ import annotations

import pytest
import torch
from conftest import word_tokenizer

from neurontrace.errors import NeurontraceError, TokenizationError
from neurontrace.neurons import NeuronId, parse_neuron, parse_neurons
from neurontrace.tokens import Batch, single_token_id, tokenize, tokenize_pairs

TOK = word_tokenizer()


def test_batch_is_left_padded_with_prompt_relative_positions():
    batch = tokenize(TOK, ["the keys to the cabinet", "a dog"])
    assert batch.input_ids.shape == (2, 5)
    assert batch.pad.tolist() == [0, 3] and batch.lengths.tolist() == [5, 2]
    assert batch.attention_mask[1].tolist() == [0, 0, 0, 1, 1]
    assert batch.position_ids[1].tolist() == [0, 0, 0, 0, 1]
    assert batch.column(1, 0) == 3 and batch.column(1, -1) == 4 and batch.column(0, -1) == 4
    assert batch.ids(1) == TOK.encode("a dog")
    with pytest.raises(TokenizationError, match="position 2 is outside prompt 1"):
        batch.column(1, 2)


def test_from_ids_and_select():
    batch = Batch.from_ids([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    sub = batch.select([1])
    assert sub.ids(0) == [8]
    assert torch.equal(batch.unpad(batch.input_ids[..., None], 1)[:, 0], torch.tensor([8]))


@pytest.mark.parametrize("prompts", ["", [""], []])
def test_empty_prompt_is_an_error(prompts):
    with pytest.raises(TokenizationError, match=r"empty|no prompts"):
        tokenize(TOK, prompts)


def test_single_token_answer():
    assert single_token_id(TOK, " are") == TOK.encode("are")[0]
    with pytest.raises(TokenizationError) as info:
        single_token_id(TOK, " are near")
    assert "must be one token but is 2 tokens ['are', 'near']" in str(info.value)
    with pytest.raises(TokenizationError, match="empty"):
        single_token_id(TOK, "")


def test_pairs_need_equal_lengths():
    clean, patch = tokenize_pairs(TOK, ["the keys are", "a dog"], ["the key is", "the dogs"])
    assert clean.input_ids.shape == patch.input_ids.shape
    assert torch.equal(clean.attention_mask, patch.attention_mask)
    with pytest.raises(TokenizationError) as info:
        tokenize_pairs(TOK, ["the keys are"], ["the key"])
    message = str(info.value)
    assert "pair 0 has unequal token lengths" in message and "3 tokens" in message and "2 tokens" in message
    with pytest.raises(TokenizationError, match="2 clean prompts but 1"):
        tokenize_pairs(TOK, ["a", "b"], ["c"])


def test_neuron_ids_round_trip():
    assert parse_neuron("L5/N123") == NeuronId(5, 123)
    assert parse_neuron("l12/n345-@-1") == NeuronId(12, 345, "-", -1)
    assert str(NeuronId(23, 8079, "-")) == "L23/N8079-"
    assert [str(n) for n in parse_neurons("L1/N2+, L3/N4@0")] == ["L1/N2+", "L3/N4@0"]
    with pytest.raises(NeurontraceError, match="write it as L<layer>/N<index>"):
        parse_neuron("layer5 neuron3")
