import pytest

from conftest import generated_text, gpt2_bpe_available
from tokenizer import EOT, CharTokenizer, TiktokenTokenizer, describe, tokenizer_from_meta


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
    assert describe(CharTokenizer("abcdefgh").meta()) == "an 8-character vocabulary"  # once "a 8-..." (trial)
    from tokenizer import article
    assert [article(n) for n in (11, 18, 65, 83, 110, 800, 1100, 11000, 118000)] == \
        ["an", "an", "a", "an", "a", "an", "a", "an", "a"]
    assert describe({"type": "tiktoken", "encoding": "gpt2"}) == "the tiktoken encoding 'gpt2'"
    assert describe(None) == "None"


def trained_bpe(vocab_size=400, seed=0):
    from tokenizer import BPETokenizer
    text = generated_text(100_000, seed=seed) + "caf\u00e9 na\u00efve \u2609 \u4e2d\u6587\u3002 1234567 don't DON'T\n"
    return BPETokenizer.train([text[i:i + 5000] for i in range(0, len(text), 5000)], vocab_size, show_progress=False)


def test_bpe_round_trip():
    """A BPE trained here: the vocabulary asked for, end-of-text last (as GPT-2's), any text back exactly (bytes it
    never saw too), special tokens in text as text, and the same ids again from its meta."""
    tok = trained_bpe()
    assert tok.vocab_size == 400 and tok.eot_id == 399
    text = "ROMEO:\nthe night <|endoftext|> caf\u00e9 \U0001f600 \x00\ttabs  and 12345678, unseen: \u0416\u0416\n\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eot_id not in ids
    assert tok.encode_array(text).tolist() == ids
    assert len(tok.encode(" the night")) == 2  # merges learned: a frequent word with its space is one token
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"  # as tiktoken decodes GPT-2's
    again = tokenizer_from_meta({"tokenizer": tok.meta()})
    assert again.encode(text) == ids and again.meta() == tok.meta()
    lengths = tok.byte_lengths()  # bits per byte: each id's bytes, together those of the text; end-of-text none
    assert lengths[ids].sum() == len(text.encode("utf-8")) and lengths[tok.eot_id] == 0


def test_bpe_training_is_deterministic():
    """Threads count the words apart: the merges must not depend on them, or two prepare runs would disagree."""
    assert trained_bpe().meta() == trained_bpe().meta()
    assert trained_bpe().meta() != trained_bpe(seed=1).meta()


def test_bpe_spec_problems_and_description():
    from tokenizer import bpe_vocab_size, spec_problems
    tok = trained_bpe()
    assert spec_problems(tok.meta(), 400) == [] and describe(tok.meta()) == "a 400-token byte-level BPE"
    assert spec_problems(tok.meta(), 512) == ["the bpe tokenizer has 400 tokens, but vocab_size is 512"]
    assert "tokenizer.json" in spec_problems({"type": "bpe", "tokenizer_json": "{not json"})[0]
    problems = spec_problems({"type": "sentencepiece", "model": "x" * 10_000})
    assert len(problems[0]) < 400  # a description too large to print is cut
    assert bpe_vocab_size("bpe") == 8192 and bpe_vocab_size("bpe:4096") == 4096 and bpe_vocab_size("gpt2") is None
    for bad in ("bpe:100", "bpe:70000"):
        with pytest.raises(ValueError, match="257 .* to 65536 tokens"):
            bpe_vocab_size(bad)


def test_bpe_refuses_what_it_would_run_otherwise():
    """A tokenizer.json (an imported model's) is run by BPETokenizer only when it runs as prepare.py trains one:
    edited ones that would put spaces at every cut, give other ids each time, or count bytes wrong are refused.
    transformers' save_pretrained adds a template that adds nothing: accepted, and the meta is unchanged by it."""
    import json

    from tokenizer import BPETokenizer, spec_problems
    tok = trained_bpe()
    spec = json.loads(tok.meta()["tokenizer_json"])
    assert spec_problems(tok.meta()) == []

    def edited(change):
        copy = json.loads(json.dumps(spec))
        change(copy)
        return {"type": "bpe", "tokenizer_json": json.dumps(copy)}

    def prefix_space(s):
        s["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True

    def dropout(s):
        s["model"]["dropout"] = 0.5

    def pad_token(s):
        s["added_tokens"].append({**s["added_tokens"][0], "id": 400, "content": "[PAD]", "special": False})

    def lowercase(s):
        s["normalizer"] = {"type": "Lowercase"}

    def bos(s):
        s["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": EOT, "type_id": 0}},
                               {"Sequence": {"id": "A", "type_id": 0}}], "pair": [], "special_tokens": {}}

    for change, why in [(prefix_space, "split otherwise"), (dropout, "without dropout"), (pad_token, "one added token"),
                        (lowercase, "text is changed"), (bos, "adds ids")]:
        problems = spec_problems(edited(change))
        assert len(problems) == 1 and why in problems[0], (change.__name__, problems)

    def no_op_template(s):  # what transformers' save_pretrained writes
        s["post_processor"] = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [], "special_tokens": {}}

    saved_again = edited(no_op_template)
    assert spec_problems(saved_again) == []
    assert BPETokenizer(saved_again["tokenizer_json"]).meta() == tok.meta()


def test_bpe_with_end_of_text_first():
    """The tokenizers library's own recipe, ByteLevelBPETokenizer.train(special_tokens=["<|endoftext|>"]), puts
    end-of-text first, in the vocabulary too (a trial's was refused): it runs, and counts the bytes of text, none for
    end-of-text (not its 13 letters)."""
    from tokenizers import ByteLevelBPETokenizer

    from tokenizer import BPETokenizer, bpe_json_problems
    text = generated_text(30_000)
    hf = ByteLevelBPETokenizer()
    hf.train_from_iterator([text[i:i + 5000] for i in range(0, len(text), 5000)], vocab_size=400,
                           special_tokens=[EOT], show_progress=False)
    assert bpe_json_problems(hf.to_str()) == []
    tok = BPETokenizer(hf.to_str())
    assert tok.eot_id == 0 and tok.byte_lengths()[0] == 0
    sample = "héllo 你好, it's\n\n <|endoftext|> 🤖"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and 0 not in ids  # end-of-text in a text is text
    assert tok.byte_lengths()[ids].sum() == len(sample.encode())


def test_mismatch_names_both_tokenizers_and_the_command():
    """Two BPEs of one size read alike in a few words: the dataset's is 'another'; the command borrows the model's."""
    from tokenizer import mismatch
    a, b = trained_bpe(), trained_bpe(seed=1)
    meta = lambda tok: {"tokenizer": tok.meta(), "vocab_size": tok.vocab_size}  # noqa: E731
    assert mismatch("out-a", meta(a), "data/b/", meta(b)) == (
        "out-a reads a 400-token byte-level BPE (400 ids), but data/b/ was tokenized with another 400-token byte-level "
        "BPE (400 ids); tokenize the text as the model reads, beside it: python prepare.py b --tokenizer=out-a "
        "--out_root=data-out-a (with the source options data/b/ was prepared with), then give --dataset=data-out-a/b")
    # a dataset of one file: its --source too; a checkpoint file's name, without .pt, names the folder
    one_file = {**meta(b), "source": {"files": ["/texts/b.txt"], "num_files": 1, "hf": None}}
    assert mismatch("runs/a/ckpt_00000200.pt", meta(a), "data/b", one_file).endswith(
        "python prepare.py b --tokenizer=runs/a/ckpt_00000200.pt --out_root=data-ckpt_00000200 --source=/texts/b.txt "
        "(and the other options data/b was prepared with), then give --dataset=data-ckpt_00000200/b")
