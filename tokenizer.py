"""
Tokenizers shared by prepare.py, train.py, sample.py and evaluate.py, and their description in meta.json.

Two kinds: character level (the vocabulary is the sorted set of characters of the corpus) and tiktoken encodings
(GPT-2 BPE by default). `tokenizer_from_meta` rebuilds exactly the tokenizer a dataset or checkpoint was made with.
"""

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
            raise UserError(f"text has characters outside this model's {len(self.chars)}-character vocabulary: "
                            f"{''.join(unknown)!r}; use only characters the training data contained") from e

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

    def encode_batch(self, texts, num_threads=1):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

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


def spec_problems(spec, vocab_size=None):
    """What is wrong with a tokenizer description (meta["tokenizer"]), found without loading any BPE files."""
    if not isinstance(spec, dict) or spec.get("type") not in ("char", "tiktoken"):
        return [f'tokenizer {spec!r} is not {{"type": "char", ...}} or {{"type": "tiktoken", ...}}']
    if spec["type"] == "tiktoken":
        encoding = spec.get("encoding", "gpt2")
        return [] if isinstance(encoding, str) else [f"tiktoken encoding {encoding!r} is not a name"]
    chars, eot = spec.get("chars"), spec.get("eot", False)
    if not isinstance(chars, str) or not chars or not isinstance(eot, bool):
        return ['a char tokenizer needs "chars" (a non-empty string) and "eot" (true or false)']
    if len(set(chars)) != len(chars):
        return ["the char tokenizer's chars repeat a character"]
    if vocab_size is not None and len(chars) + eot != vocab_size:
        return [f"the char tokenizer has {len(chars)} characters{' and an end-of-text id' if eot else ''}, "
                f"but vocab_size is {vocab_size}"]
    return []


def describe(spec):
    """A tokenizer description (meta["tokenizer"]) in a few words, for messages."""
    if isinstance(spec, dict) and spec.get("type") == "char" and isinstance(spec.get("chars"), str):
        return f"a {len(spec['chars'])}-character vocabulary" + (" with end-of-text" if spec.get("eot") else "")
    if isinstance(spec, dict) and spec.get("type") == "tiktoken":
        return f"the tiktoken encoding {spec.get('encoding', 'gpt2')!r}"
    return repr(spec)


def tokenizer_from_meta(meta):
    """The tokenizer described by meta["tokenizer"] (meta.json of a dataset, or a checkpoint's copy of it)."""
    spec = meta.get("tokenizer")
    problems = spec_problems(spec)
    if problems:
        raise UserError(f"unusable tokenizer description in meta: {problems[0]}")
    if spec["type"] == "char":
        return CharTokenizer(spec["chars"], eot=spec.get("eot", False))
    return TiktokenTokenizer(spec.get("encoding", "gpt2"))


def make_tokenizer(name, text=None):
    """A tokenizer by name, as in prepare.py's --tokenizer: 'char' (needs the text for its vocabulary) or a tiktoken encoding."""
    if name == "char":
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)
