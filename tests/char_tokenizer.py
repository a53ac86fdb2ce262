"""A character-level tokenizer over printable ASCII + newline: 96 ids, the tiny models' vocabulary.

Digits and letters are single tokens, so the paper's renormalised metric is hand-checkable.
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # 95 printable + newline = 96


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="?", eos_token="~", pad_token="`")
    wrapped.padding_side = "left"
    return wrapped


assert len(CHARS) == 96 and set(string.digits) <= set(CHARS)
