import pytest

from conftest import gpt2_bpe_available
from tokenizer import CharTokenizer, TiktokenTokenizer, describe, tokenizer_from_meta


def test_char_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.chars == "".join(sorted(set(text)))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    again = tokenizer_from_meta({"tokenizer": tok.meta()})
    assert again.encode(text) == ids
    assert CharTokenizer("a\u00e9\u2609", eot=True).byte_lengths().tolist() == [1, 2, 3, 0]  # end-of-text: none


def test_char_out_of_vocabulary():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(Exception, match="outside this model's 3-character vocabulary: 'z'"):
        tok.encode("abz")


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_gpt2_round_trip():
    tok = TiktokenTokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    ids = tok.encode("Hello world<|endoftext|>")
    assert ids[:2] == [15496, 995]  # GPT-2's ids for "Hello" and " world"
    assert 50256 not in ids  # special tokens in text are plain text
    assert tok.decode(ids) == "Hello world<|endoftext|>"
    # bits per byte count each token's bytes: together those of the text; end-of-text none
    text = "caf\u00e9 \u2609 na\u00efve"
    lengths = tok.byte_lengths()
    assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8")) and lengths[tok.eot_id] == 0


def test_describe_names_a_tokenizer_in_a_few_words():
    """For messages: a char vocabulary by its size (the whole dict once filled an error line), tiktoken by name."""
    assert describe(CharTokenizer("abc", eot=True).meta()) == "a 3-character vocabulary with end-of-text"
    assert describe({"type": "tiktoken", "encoding": "gpt2"}) == "the tiktoken encoding 'gpt2'"
    assert describe(None) == "None"
