"""Template slots: which slot of a pair each token of its prompt falls in, so prompts of different token
lengths align slot by slot ("next to" and "near" are both the preposition slot).

Slot 0 holds special tokens (BOS); slot ``i + 1`` is the pair's ``slots[i]``. A token belongs to the slot that
holds its last character (a leading space goes with the word after it).
"""

from __future__ import annotations

from typing import Any

from neurontrace.errors import DatasetError, TokenizationError
from neurontrace.tokens import _tokenizer_of


def slot_map(tokenizer: Any, pair: Any) -> list[int]:
    """The slot of every token of ``pair.clean_prefix`` (with special tokens), as the model sees it."""
    if pair.slots is None:
        raise DatasetError(
            f"pair {pair.clean_prefix!r} has no slots; --nodes slots needs pairs with a 'slots' list "
            "(the project's generators write them), or use --nodes summed"
        )
    tok = _tokenizer_of(tokenizer)
    text = pair.clean_prefix
    ends, pos = [], 0
    for piece in pair.slots:
        start = text.index(piece, pos)
        ends.append(start + len(piece))
        pos = start + len(piece)
    try:
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise TokenizationError(
            "this tokenizer gives no character offsets (a slow tokenizer); slots need a fast tokenizer"
        ) from None
    out = []
    for start, end in enc["offset_mapping"]:
        if end <= start:
            out.append(0)  # a special token
            continue
        out.append(1 + next(i for i, e in enumerate(ends) if end - 1 < e))
    return out
