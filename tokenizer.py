"""
Tokenizers shared by prepare.py, train.py, sample.py and evaluate.py, and their description in meta.json.

Three kinds: character level (the vocabulary is the sorted set of characters of the corpus), tiktoken encodings
(GPT-2 BPE by default), and a byte-level BPE that prepare.py trains on the corpus itself (`--tokenizer=bpe:8192`).
`tokenizer_from_meta` rebuilds exactly the tokenizer a dataset or checkpoint was made with.
"""

import json
import os
import re

import numpy as np

from configurator import UserError


class CharTokenizer:
    """One id per character, in sorted order; an optional end-of-text id one past the last character."""

    def __init__(self, chars, eot=False):
        self.chars = "".join(chars)
        if len(set(self.chars)) != len(self.chars):
            raise UserError("char vocabulary has repeated characters")
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.eot_id = len(self.chars) if eot else None
        self.vocab_size = len(self.chars) + (1 if eot else 0)
        self._table = None  # code point -> id, built on first encode_array

    @classmethod
    def from_text(cls, text, eot=False):
        return cls(sorted(set(text)), eot=eot)

    def encode(self, text):
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            unknown = sorted({ch for ch in text if ch not in self.stoi})
            crlf = "\r" in unknown and "\n" in self.stoi  # a file saved on Windows, for a model that never saw one
            why = " (the carriage returns of Windows line endings: convert the file, e.g. dos2unix)" if crlf else ""
            raise UserError(f"text has characters outside this model's {len(self.chars)}-character vocabulary: "
                            f"{''.join(unknown)!r}; use only characters the training data contained{why}") from e

    def encode_array(self, text):
        """encode() as a numpy array, through a code-point lookup table: ~50x faster, what prepare.py uses."""
        if self._table is None:
            self._table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int64)
            self._table[[ord(ch) for ch in self.chars]] = np.arange(len(self.chars))
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        if len(points) and (points.max() >= len(self._table) or ids.min() < 0):
            self.encode(text)  # raises, naming the unknown characters
        return ids

    def decode(self, ids):
        # the end-of-text id (and padded vocab ids a model should never produce) decode to nothing
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if i < n)

    def byte_lengths(self):
        """(vocab_size,) int64: the UTF-8 bytes of each id's text; 0 for end-of-text, which stands for none."""
        return np.array([len(ch.encode("utf-8")) for ch in self.chars] + [0] * (self.eot_id is not None),
                        dtype=np.int64)

    def meta(self):
        return {"type": "char", "chars": self.chars, "eot": self.eot_id is not None}


class TiktokenTokenizer:
    """A tiktoken encoding (GPT-2 BPE: "gpt2"); special tokens in the text are encoded as ordinary text."""

    def __init__(self, encoding="gpt2"):
        import tiktoken  # imported here so char-level users never need its BPE files
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except ValueError:
            known = ", ".join(tiktoken.list_encoding_names())
            raise UserError(f"unknown tiktoken encoding {encoding!r}; known: {known}") from None
        except Exception as e:  # first use downloads the BPE files; offline this fails deep inside requests
            raise UserError(f"could not load the {encoding!r} BPE files ({type(e).__name__}); tiktoken downloads "
                            "them on first use, so go online once or point TIKTOKEN_CACHE_DIR at a folder "
                            "holding them") from None
        self.encoding = encoding
        self.eot_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_array(self, text):
        """encode() as a numpy array: tiktoken's own numpy encoder where it has one (no list of Python ints)."""
        if hasattr(self.enc, "encode_to_numpy"):  # tiktoken >= 0.8; with nothing allowed, the same as encode_ordinary
            return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(np.int64)
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])

    def byte_lengths(self):
        """(vocab_size,) int64: the bytes of each id's text; 0 for special tokens (end-of-text) and unused ids."""
        special = {self.enc.encode_single_token(s) for s in self.enc.special_tokens_set}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in special:
                try:
                    lengths[i] = len(self.enc.decode_single_token_bytes(i))
                except KeyError:  # a gap in the encoding's ids
                    pass
        return lengths

    def meta(self):
        return {"type": "tiktoken", "encoding": self.encoding}


EOT = "<|endoftext|>"
BPE_DEFAULT_VOCAB = 8192
# the pre-tokenizer of a trained BPE: GPT-4's (tiktoken's cl100k_base) split of text into words, numbers of up to
# three digits, punctuation runs and whitespace, written without its possessive quantifiers (the same matches here)
BPE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


class BPETokenizer:
    """
    A byte-level BPE run by Hugging Face tokenizers: one prepare.py trains on the corpus (GPT-4's pre-tokenizer, the
    256 bytes as its alphabet so that any text encodes, merges learned from the training text, end-of-text as the last
    id, as in GPT-2), or an imported model's that runs the same way (bpe_json_problems). Described in meta by its
    whole tokenizer.json text, so a checkpoint carries its tokenizer; export.py writes that same file for
    transformers. Special tokens in the text are encoded as ordinary text, as TiktokenTokenizer does.
    """

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer  # imported here: only BPE users need it
        self.tok = Tokenizer.from_str(tokenizer_json)
        # as prepare.py writes it: transformers' save_pretrained adds a template that adds nothing, so that a
        # tokenizer.json saved again still equals, as meta, the one a dataset was tokenized with
        self.tok.post_processor = None
        self.json = self.tok.to_str()
        self.tok.encode_special_tokens = True  # '<|endoftext|>' in a text is text; not saved in the json
        self.eot_id = self.tok.token_to_id(EOT)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts, vocab_size=BPE_DEFAULT_VOCAB, show_progress=True):
        """Learn vocab_size - 1 tokens (bytes and merges) from an iterable of texts, then add end-of-text. The merges
        depend only on the text: threads count words apart, and ties between equally frequent pairs are broken by the
        pairs themselves."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(BPE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # each byte as one character
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        tok.add_special_tokens([EOT])
        return cls(tok.to_str())

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text):
        """encode() as a numpy array; what prepare.py uses: without the character offsets of each token, which
        tokenizers >= 0.21 can skip (1.6x faster)."""
        if hasattr(self.tok, "encode_batch_fast"):
            return np.array(self.tok.encode_batch_fast([text], add_special_tokens=False)[0].ids, dtype=np.int64)
        return np.array(self.encode(text), dtype=np.int64)

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=False)

    def byte_lengths(self):
        """(vocab_size,) int64: the bytes of each id's text (one per character of its byte-level spelling); 0 for
        end-of-text."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tok.get_vocab(with_added_tokens=False).items():
            lengths[i] = len(token)
        if self.eot_id is not None:  # in the model's vocabulary too where it is id 0: still no text
            lengths[self.eot_id] = 0
        return lengths

    def meta(self):
        return {"type": "bpe", "tokenizer_json": self.json}


def bpe_vocab_size(name):
    """The vocabulary size a --tokenizer name asks a trained BPE for ('bpe', 'bpe:4096'); None for other names;
    ValueError for a malformed one."""
    if name != "bpe" and not name.startswith("bpe:"):
        return None
    if name.startswith("bpe:") and not name[4:].isdigit():
        raise ValueError(f"write a BPE's vocabulary size as bpe:N, e.g. bpe:{BPE_DEFAULT_VOCAB}")
    size = int(name[4:]) if name.startswith("bpe:") else BPE_DEFAULT_VOCAB
    if not 257 <= size <= 2**16:  # the 256 bytes and end-of-text; ids must fit the uint16 shards
        raise ValueError(f"a BPE's vocabulary is 257 (the bytes and end-of-text) to 65536 tokens, not {size}")
    return size


def bpe_json_problems(text, vocab_size=None):
    """
    What keeps a tokenizer.json text from being one BPETokenizer runs as it was meant to: a byte-level BPE (each id's
    text is its bytes, one character each, as byte_lengths counts them), its text split by this module's
    pre-tokenizer or GPT-2's (where prepare.safe_cut may cut it) with no space put in front, end-of-text as its one
    added token and its first or last id, nothing done to the text before or ids added after (transformers'
    save_pretrained adds a template that adds none), and vocab_size ids.
    """
    try:
        spec = json.loads(text)
        model, added = spec["model"], spec.get("added_tokens") or []
        vocab = dict(model["vocab"])
        pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor") or {}
        size = len(vocab.keys() | {t["content"] for t in added})
    except (TypeError, ValueError, KeyError, AttributeError):
        return ['a bpe tokenizer needs "tokenizer_json": the text of a Hugging Face tokenizer.json']
    ours = (pre.get("type") == "Sequence" and [p.get("type") for p in pre.get("pretokenizers", [])] ==
            ["Split", "ByteLevel"] and pre["pretokenizers"][0].get("pattern") == {"Regex": BPE_PATTERN}
            and pre["pretokenizers"][0].get("behavior") == "Isolated" and not pre["pretokenizers"][0].get("invert")
            and not pre["pretokenizers"][1].get("use_regex") and not pre["pretokenizers"][1].get("add_prefix_space"))
    gpt2s = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    alphabet = set(bytes_to_unicode().values())
    why = []
    if model.get("type") != "BPE" or model.get("dropout") or not set("".join(vocab)) <= alphabet or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        why.append("not a byte-level BPE without dropout")
    if spec.get("normalizer") or not (ours or gpt2s):
        why.append("its text is changed or split otherwise than by GPT-4's or GPT-2's pre-tokenizer, unprefixed")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        why.append("its decoder is not ByteLevel")
    if post and not (post.get("type") == "ByteLevel" or post.get("type") == "TemplateProcessing" and
                     not post.get("special_tokens") and [list(p) for p in post.get("single", [])] == [["Sequence"]]):
        why.append("it adds ids to what it encodes")
    # end-of-text last, as prepare.py trains it, or first, as tokenizers' ByteLevelBPETokenizer.train puts its special
    # tokens (in the vocabulary too, where byte_lengths leaves it out)
    if [t.get("content") for t in added] != [EOT] or added[0].get("id") not in (0, size - 1):
        why.append(f"its one added token is not {EOT}, first or last")
    if why:
        return [f"the bpe tokenizer's tokenizer.json cannot be run as prepare.py trains one: {'; '.join(why)}"]
    if vocab_size is not None and size != vocab_size:
        return [f"the bpe tokenizer has {size} tokens, but vocab_size is {vocab_size}"]
    return []


def bytes_to_unicode():
    """GPT-2's byte-to-character table for vocab.json, merges.txt and byte-level BPEs: printable Latin-1 bytes stand
    for themselves, the other 68 bytes (controls, space, ...) take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def spec_problems(spec, vocab_size=None):
    """What is wrong with a tokenizer description (meta["tokenizer"]), found without loading any BPE files."""
    if not isinstance(spec, dict) or spec.get("type") not in ("char", "tiktoken", "bpe"):
        return [f'tokenizer {short(spec)} is not {{"type": "char", ...}}, {{"type": "tiktoken", ...}} or '
                f'{{"type": "bpe", ...}}']
    if spec["type"] == "tiktoken":
        encoding = spec.get("encoding", "gpt2")
        if not isinstance(encoding, str):
            return [f"tiktoken encoding {encoding!r} is not a name"]
        import tiktoken
        if encoding not in tiktoken.list_encoding_names():  # known without loading (or downloading) its files
            return [f"tiktoken has no encoding {encoding!r} (it has: {', '.join(tiktoken.list_encoding_names())})"]
        if vocab_size is not None and encoding in ("gpt2", "r50k_base") and vocab_size != 50257:
            return [f"the tiktoken encoding {encoding!r} has 50,257 tokens, but vocab_size is {vocab_size:,}"]
        return []
    if spec["type"] == "bpe":
        return bpe_json_problems(spec.get("tokenizer_json"), vocab_size)
    chars, eot = spec.get("chars"), spec.get("eot", False)
    if not isinstance(chars, str) or not chars or not isinstance(eot, bool):
        return ['a char tokenizer needs "chars" (a non-empty string) and "eot" (true or false)']
    if len(set(chars)) != len(chars):
        return ["the char tokenizer's chars repeat a character"]
    if vocab_size is not None and len(chars) + eot != vocab_size:
        return [f"the char tokenizer has {len(chars)} characters{' and an end-of-text id' if eot else ''}, "
                f"but vocab_size is {vocab_size}"]
    return []


def article(n):
    """'an' before a number said with a vowel first (8, 80-89, 11, 18, 11,000, 800,000, ...), else 'a'."""
    digits = str(n)
    return "an" if digits[0] == "8" or len(digits) % 3 == 2 and digits[:2] in ("11", "18") else "a"


def describe(spec):
    """A tokenizer description (meta["tokenizer"]) in a few words, for messages."""
    if isinstance(spec, dict) and spec.get("type") == "char" and isinstance(spec.get("chars"), str):
        n = len(spec["chars"])
        return f"{article(n)} {n}-character vocabulary" + (" with end-of-text" if spec.get("eot") else "")
    if isinstance(spec, dict) and spec.get("type") == "tiktoken":
        return f"the tiktoken encoding {spec.get('encoding', 'gpt2')!r}"
    if isinstance(spec, dict) and spec.get("type") == "bpe" and not bpe_json_problems(spec.get("tokenizer_json")):
        vocab = json.loads(spec["tokenizer_json"])["model"]["vocab"]
        n = len(vocab.keys() | {EOT})
        return f"{article(n)} {n:,}-token byte-level BPE"
    return short(spec)


def mismatch(model, model_meta, data_dir, data_meta):
    """One line for a dataset tokenized otherwise than a model reads: the two tokenizers in a few words (the dataset's
    as 'another' where the words are alike: two BPEs of one size), then how to tokenize the text as the model reads.
    model is what names the model to --init_from (a checkpoint, a run's folder, a Hugging Face GPT-2)."""
    mine, theirs = (describe(m.get("tokenizer")) + (f" ({m['vocab_size']} ids)" if m.get("vocab_size") else "")
                    for m in (model_meta, data_meta))
    if theirs == mine:
        theirs = "another" + theirs[1:] if theirs.startswith("a ") else "another tokenizer: " + theirs
    borrow = "gpt2" if model_meta.get("tokenizer") == {"type": "tiktoken", "encoding": "gpt2"} else model
    # into a folder of its own: over data_dir it would take the dataset from the models that read it as it is
    name = os.path.basename(os.path.normpath(data_dir))
    root = "data-" + re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(borrow)).removesuffix(".pt"))
    source = (data_meta.get("source") or {})
    files = source.get("files") or []
    given = f" --source={files[0]} (and the other options {data_dir} was prepared with)" \
        if len(files) == 1 and source.get("num_files") == 1 and not source.get("hf") \
        else f" (with the source options {data_dir} was prepared with)"
    return (f"{model} reads {mine}, but {data_dir} was tokenized with {theirs}; tokenize the text as the model reads, "
            f"beside it: python prepare.py {name} --tokenizer={borrow} --out_root={root}{given}, then give "
            f"--dataset={root}/{name}")


def short(spec):
    """repr(spec), cut: a tokenizer.json's text fills pages."""
    text = repr(spec)
    return text if len(text) <= 200 else text[:200] + "...}"


def tokenizer_from_meta(meta):
    """The tokenizer described by meta["tokenizer"] (meta.json of a dataset, or a checkpoint's copy of it)."""
    spec = meta.get("tokenizer")
    problems = spec_problems(spec)
    if problems:
        raise UserError(f"unusable tokenizer description in meta: {problems[0]}")
    if spec["type"] == "char":
        return CharTokenizer(spec["chars"], eot=spec.get("eot", False))
    if spec["type"] == "bpe":
        return BPETokenizer(spec["tokenizer_json"])
    return TiktokenTokenizer(spec.get("encoding", "gpt2"))


def make_tokenizer(name, text=None):
    """A tokenizer by name, as in prepare.py's --tokenizer: 'char' (needs the text for its vocabulary) or a tiktoken encoding."""
    if name == "char":
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)
