"""
The Hugging Face GPT-2 format, both ways: GPT-2 weights in (from the Hub or a local folder) to start or fine-tune
from, and trained models out as a folder that transformers loads with no extra code.

A Hugging Face GPT-2 is a `GPT2LMHeadModel`: config.json (GPT2Config), model.safetensors (or the older
pytorch_model.bin) and tokenizer files. Our module names are the same, so the weights are a key-for-key copy except:
- the four projections are transformers' Conv1D, which stores its matrix as (in, out): the transpose of nn.Linear;
- our token embedding has padded rows for vocabularies of 1,024 or more (vocab_size rounded up to a multiple of 64,
  see GPTConfig); the file has the real vocabulary only, so rows are added on import (never used: logits are cut
  to the real vocabulary) and dropped on export. A file whose own rows run past its tokenizer's ids, padded to a
  multiple of 64 or 128 (resize_token_embeddings(pad_to_multiple_of=64), nanoGPT's 50,304), is read the same way;
- lm_head is tied to wte in both; the file usually leaves lm_head out and transformers ties it back;
- GPT-2 always has biases. A bias=False model is exported with zero biases, which computes exactly the same function
  (a LayerNorm or Linear without bias is one whose bias is zero); it comes back from an import as bias=True.
Older files name the keys without the "transformer." prefix and carry the causal-mask buffers (attn.bias,
attn.masked_bias); both layouts are read.

transformers itself is never imported here (it takes seconds): config.json is plain JSON, the weights go through
safetensors, the Hub download through huggingface_hub (transformers' own downloader), tokenizer files through
tokenizers. The tests check the results against transformers.
"""

import dataclasses
import errno
import json
import os
import re
import shutil
import socket

import torch

from configurator import UserError
from model import GPT, GPT2_OPTIONS, GPTConfig, head_problems
from tokendata import GPT2_META
from tokenizer import EOT, BPETokenizer, bpe_json_problems, bytes_to_unicode, mismatch, spec_problems

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four GPT-2s on the Hub
# weights transformers keeps in Conv1D layout (in, out); nn.Linear keeps (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers older transformers versions saved with the weights; not weights at all
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# GPTConfig fields a GPT2Config can express; any other field (a future architecture option) blocks the export
GPT2_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
# every file an export writes: a re-export may replace a folder holding only these
TOKENIZER_FILES = {"tiktoken": ("vocab.json", "merges.txt", "tokenizer_config.json"),
                   "char": ("tokenizer.json", "tokenizer_config.json"),
                   "bpe": ("tokenizer.json", "tokenizer_config.json")}
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", *sum(TOKENIZER_FILES.values(), ())}
# the weights' dtypes an export writes (export.py --dtype); import reads any of them into float32
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------------
# weights and config, both ways

def gpt2_layout(config):
    """{key: shape} of the tensors of a GPT-2 of config's size, with biases, in our state dict's names and shapes:
    what a GPT-2 file holds, before the Conv1D transposes and the vocabulary cut. Written out from GPT-2's
    definition, not taken from model.py: a weight that a changed model.py adds, reshapes or lacks is seen, not
    exported as GPT-2's."""
    n, rows = config.n_embd, config.padded_vocab_size
    block = {"ln_1.weight": (n,), "ln_1.bias": (n,), "attn.c_attn.weight": (3 * n, n), "attn.c_attn.bias": (3 * n,),
             "attn.c_proj.weight": (n, n), "attn.c_proj.bias": (n,), "ln_2.weight": (n,), "ln_2.bias": (n,),
             "mlp.c_fc.weight": (4 * n, n), "mlp.c_fc.bias": (4 * n,), "mlp.c_proj.weight": (n, 4 * n),
             "mlp.c_proj.bias": (n,)}
    layout = {"transformer.wte.weight": (rows, n), "transformer.wpe.weight": (config.block_size, n),
              **{f"transformer.h.{i}.{key}": shape for i in range(config.n_layer) for key, shape in block.items()},
              "transformer.ln_f.weight": (n,), "transformer.ln_f.bias": (n,), "lm_head.weight": (rows, n)}
    return {key: torch.Size(shape) for key, shape in layout.items()}


def to_hf_state_dict(model, dtype="float32"):
    """GPT2LMHeadModel's state dict for our model, in `dtype` (one of EXPORT_DTYPES): Conv1D layout, real vocabulary
    rows, zero biases where ours has none, no lm_head (tied). UserError when the model has something GPT-2 cannot
    express, or a weight too large for dtype."""
    cfg = model.config
    # an option GPT-2 lacks at GPT-2's value; a field this file does not know (a fork's) at its default, its off
    unknown = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if f.name not in GPT2_FIELDS and getattr(cfg, f.name) != GPT2_OPTIONS.get(f.name, f.default)]
    state = model.state_dict()
    layout = gpt2_layout(cfg)
    extra = sorted(set(state) - set(layout))
    missing = sorted(k for k in set(layout) - set(state) if cfg.bias or not k.endswith(".bias"))
    reshaped = [f"{k} of shape {tuple(state[k].shape)}, not {tuple(layout[k])}" for k in state
                if k in layout and state[k].shape != layout[k]]
    found = unknown or extra[:5] + [f"no {k}" for k in missing[:5]] + reshaped[:5]  # an option's weights follow it
    if found:
        raise UserError(f"GPT-2 cannot express this model ({', '.join(found)}): transformers' GPT2LMHeadModel has no "
                        "such option or weights, so there is no faithful export")
    hf = {}
    for key, shape in layout.items():
        if key == "lm_head.weight":
            continue
        value = state[key] if key in state else torch.zeros(shape)  # bias=False: a zero bias is no bias
        if key == "transformer.wte.weight":
            value = value[:cfg.vocab_size]
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        hf[key] = value.detach().to("cpu", getattr(torch, dtype)).contiguous()
        if not torch.isfinite(hf[key]).all() and torch.isfinite(value).all():  # float16 tops out at 65,504
            raise UserError(f"{key} has weights too large for {dtype}: export with --dtype=bfloat16 or float32")
    return hf


def from_hf_state_dict(hf_state, config, where="the weights"):
    """Our state dict from GPT2LMHeadModel weights in either key layout; `config` is the GPTConfig they are for."""
    state = {}
    for key, value in hf_state.items():
        if key.endswith(MASK_BUFFERS):
            continue
        key = key.removeprefix("transformer.")
        state[key if key == "lm_head.weight" else "transformer." + key] = value.to(torch.float32)
    wte, lm_head = state.get("transformer.wte.weight"), state.pop("lm_head.weight", None)
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise UserError(f"{where}: lm_head differs from the token embedding (untied); this GPT ties them, "
                        "as GPT-2 does, and cannot load an untied model")
    layout = gpt2_layout(config)
    missing = sorted(set(layout) - set(state) - {"lm_head.weight"})
    extra = sorted(set(state) - set(layout))
    if missing or extra:
        problems = [f"{what} {', '.join(keys[:5])}"
                    for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
        raise UserError(f"{where} do not fit a GPT-2 of this config: {'; '.join(problems)}")
    for key in list(state):
        if key.endswith(CONV1D_WEIGHTS):
            state[key] = state[key].t()
        elif key == "transformer.wte.weight":  # padded rows: never looked up, their logits cut off
            rows = state[key][:config.padded_vocab_size]  # a folder's own padding past that: never used either
            state[key] = torch.cat([rows, rows.new_zeros(config.padded_vocab_size - rows.size(0), rows.size(1))])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def config_from_hf(hf, where="config.json"):
    """The GPTConfig of a GPT2Config (as a dict); every feature GPT-2 allows but this GPT lacks is reported at once.
    Missing keys take GPT2Config's defaults."""
    n_embd, n_head = hf.get("n_embd", 768), hf.get("n_head", 12)
    problems = head_problems(n_embd, n_head)
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (this GPT uses GPT-2's tanh GELU)")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={hf['n_inner']} (this GPT's MLP is 4 * n_embd = {4 * n_embd})")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        problems.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (this GPT uses 1e-5)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaling other than 1/sqrt(head size)")
    if hf.get("add_cross_attention", False):
        problems.append("cross-attention")
    if not hf.get("tie_word_embeddings", True):
        problems.append("untied lm_head (tie_word_embeddings=false)")
    if problems:
        raise UserError(f"{where}: not a GPT-2 this GPT can load: {'; '.join(problems)}")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf.get("n_layer", 12), n_head=n_head, n_embd=n_embd, bias=True, **GPT2_OPTIONS)


def hf_config(config, eot_id, dtype="float32"):
    """config.json for our GPTConfig: a GPT2Config with the real sizes and vocabulary."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation, as ours
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------------------------
# import

def resolve(name_or_path):
    """A local folder holding the model: the path itself, or the Hub's files downloaded into transformers' cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.isfile(name_or_path):  # model.pth, say: a checkpoint of ours under another name reads as .pt
        raise UserError(f"{name_or_path} is a file, neither a Hugging Face model folder (config.json and "
                        "model.safetensors) nor a checkpoint ending in .pt; a checkpoint of this toolkit's or "
                        "nanoGPT's saved under another name is read once renamed to .pt")
    if name_or_path not in GPT2_NAMES and "/" not in name_or_path:
        raise UserError(f"{name_or_path!r} is neither a folder nor one of {', '.join(GPT2_NAMES)} (or a Hub "
                        "repository such as user/model)")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path):
        # a Hub repository is user/model: this is a path, and not a folder
        raise UserError(f"{name_or_path}: " + ("not a folder" if os.path.exists(name_or_path) else "no such folder") +
                        " (a Hugging Face model folder holds config.json and model.safetensors)")
    import huggingface_hub
    weights = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    small = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
    try:
        folder = huggingface_hub.snapshot_download(name_or_path, allow_patterns=small + weights)
        if not any(os.path.exists(os.path.join(folder, f)) for f in weights[:2]):  # an old repository: .bin only
            folder = huggingface_hub.snapshot_download(name_or_path, allow_patterns=small + ["pytorch_model.bin"])
    except Exception as e:  # offline, unknown repository, gated, ...: many types
        raise UserError(f"could not download {name_or_path} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); go online, or give a local folder with "
                        "config.json and model.safetensors") from None
    return folder


def read_weights(folder):
    """The state dict in a Hugging Face folder: model.safetensors, its shards, or pytorch_model.bin."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    legacy = os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.exists(single) or os.path.exists(index):
            from safetensors.torch import load_file
            if os.path.exists(single):
                return load_file(single)
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(os.path.join(folder, shard)).items()}
        if os.path.exists(legacy):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or garbled file raises many types
        raise UserError(f"{folder}: the weights are truncated or corrupt ({type(e).__name__}: {e})") from None
    raise UserError(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")


def read_config(folder):
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError:
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def pretrained_config(name_or_path):
    """The GPTConfig of a Hugging Face GPT-2 (see load_hf_gpt2 for the names), from its config.json and tokenizer:
    the shape of the model its weights make. An embedding with rows past the tokenizer's ids, padded to a multiple of
    64 or 128 (nanoGPT's 50,304 for GPT-2's 50,257; resize_token_embeddings(pad_to_multiple_of=64)), is the
    tokenizer's vocabulary and padding, which from_hf_state_dict makes this toolkit's."""
    folder = resolve(name_or_path)
    config = config_from_hf(read_config(folder), where=f"{name_or_path}/config.json")
    try:
        config.vocab_size = hf_tokenizer_meta(name_or_path)["vocab_size"]
    except UserError:  # weights without a tokenizer here: what reads text says so, in its words
        pass
    return config


def load_hf_gpt2(name_or_path, dropout=0.0, block_size=None):
    """
    A GPT (float32, CPU) with the weights of a Hugging Face GPT-2: one of gpt2, gpt2-medium, gpt2-large, gpt2-xl
    (downloaded once into the Hugging Face cache), a Hub repository, or a local folder. dropout is for fine-tuning;
    a smaller block_size crops the position table (GPT-2's 1024 is often more than fine-tuning needs).
    """
    folder = resolve(name_or_path)
    config = pretrained_config(name_or_path)
    config.dropout = dropout
    state = from_hf_state_dict(read_weights(folder), config, where=f"{name_or_path}'s weights")
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{name_or_path}'s weights do not fit its config.json: {e}") from None
    if block_size is not None:
        fit_context(model, block_size, name_or_path)
    return model


def fit_context(model, block_size, name):
    """Fit a pretrained model to this run's block_size: crop its position table to a smaller one (GPT-2's 1024 is
    often more than fine-tuning needs); a larger one is refused, those positions were never trained, except for a
    rope model, whose angles are computed for any length. `name` says where the weights came from."""
    if block_size > model.config.block_size and not model.config.rope:
        raise UserError(f"block_size={block_size} exceeds {name}'s context of {model.config.block_size} tokens; use "
                        f"--block_size={model.config.block_size} or less")
    if block_size != model.config.block_size:
        model.set_block_size(block_size)


def hf_tokenizer_meta(name_or_path):
    """
    The tokenizer meta (as in a dataset's meta.json) of a Hugging Face GPT-2: GPT-2 BPE for OpenAI's models; for a
    folder, read from its tokenizer files: GPT-2 BPE, the char-level tokenizer export.py writes, or a byte-level BPE
    of its own with end-of-text (what prepare.py --tokenizer=bpe:N trains).
    """
    if name_or_path in GPT2_NAMES and not os.path.isdir(name_or_path):  # a local folder wins, as in resolve()
        return GPT2_META
    folder = resolve(name_or_path)
    rows = read_config(folder).get("vocab_size", 50257)  # the embedding's, maybe padded past the tokenizer's ids

    def fits(n):  # a tokenizer of n ids: the rows, or n rounded up to a multiple of 64 or 128 (padding, never sampled)
        return n == rows or rows % 64 == 0 and n < rows < n + 128
    path = os.path.join(folder, "tokenizer.json")
    text, spec = "", {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        spec = json.loads(text)["model"]
    if spec.get("type") == "WordLevel":  # ours: one token per character, then maybe <|endoftext|>
        tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda item: item[1])]
        eot = tokens[-1:] == [EOT]
        chars = tokens[:-1] if eot else tokens
        if all(len(t) == 1 for t in chars) and fits(len(tokens)):
            return {"tokenizer": {"type": "char", "chars": "".join(chars), "eot": eot}, "vocab_size": len(tokens),
                    "eot_id": len(chars) if eot else None}
        reason = (f" (its tokenizer.json's {len(tokens):,} words do not fit the model's {rows:,} rows)"
                  if all(len(t) == 1 for t in chars) else " (a WordLevel tokenizer of words, not single characters)")
    elif spec.get("type", "BPE") == "BPE":
        vocab = spec.get("vocab")
        if vocab is None and os.path.exists(os.path.join(folder, "vocab.json")):
            with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                vocab = json.load(f)
        # weights alone: GPT-2's, by size; " the" at GPT-2's id first, so another BPE needs no GPT-2 files
        if fits(50257) and (vocab is None or vocab.get("\u0120the") == 262 and vocab == gpt2_vocab()):
            return GPT2_META
        problems = bpe_json_problems(text) if text else ["no tokenizer.json"]
        if not problems:
            tokenizer = BPETokenizer(text)  # its meta holds the file as prepare.py writes it, whoever saved it last
            if fits(tokenizer.vocab_size):
                return {"tokenizer": tokenizer.meta(), "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
            problems = bpe_json_problems(text, rows)
        if fits(50257) and vocab is not None and len(vocab) == 50257:
            raise UserError(f"{name_or_path}'s tokenizer has 50,257 tokens, as GPT-2's, but other ids for them, and "
                            f"no tokenizer.json of a byte-level BPE with {EOT}: a BPE this toolkit cannot read")
        reason = f" ({problems[0]})"
    else:
        reason = f" (a {spec.get('type')} model in its tokenizer.json)"
    raise UserError(f"cannot tell which tokenizer {name_or_path} uses{reason}: this toolkit knows GPT-2 BPE (50257 "
                    f"tokens), the character-level tokenizer export.py writes, and byte-level BPEs with {EOT} in a "
                    f"tokenizer.json (what prepare.py --tokenizer=bpe:N trains)")


def check_dataset_tokenizer(name_or_path, data_dir, data_meta):
    """UserError unless the dataset in data_dir was tokenized the way the pretrained model `name_or_path` expects."""
    want = hf_tokenizer_meta(name_or_path)
    if data_meta["tokenizer"] != want["tokenizer"] or data_meta["vocab_size"] != want["vocab_size"]:
        raise UserError(mismatch(name_or_path, want, data_dir, data_meta))


# ----------------------------------------------------------------------------------------------------------------
# export

def gpt2_bpe_files():
    """
    (vocab.json, merges.txt) contents of GPT-2's tokenizer, made from tiktoken's GPT-2 encoding (which downloads
    or finds its files as usual). tiktoken keeps only each token's rank; token 256 + i is the result of merge i,
    and its two halves are what byte-pair merging of the token's bytes gives using only earlier merges.
    """
    ranks, eot_id = _gpt2_ranks()
    to_text = bytes_to_unicode()

    def text(token):
        return "".join(to_text[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"tiktoken's GPT-2 token {rank} cannot be split into a merge; its BPE files look damaged")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    return json.dumps(gpt2_vocab(ranks, eot_id)), "#version: 0.2\n" + "\n".join(merges) + "\n"


def _gpt2_ranks():
    """(each GPT-2 token's bytes -> its id, end-of-text aside; the end-of-text id), from tiktoken's GPT-2 encoding."""
    from tokenizer import TiktokenTokenizer
    enc = TiktokenTokenizer("gpt2").enc
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != enc.eot_token}, enc.eot_token


def gpt2_vocab(ranks=None, eot_id=None):
    """GPT-2's vocab.json: each token's text (bytes_to_unicode) -> its id, end-of-text included."""
    if ranks is None:
        ranks, eot_id = _gpt2_ranks()
    to_text = bytes_to_unicode()
    vocab = {"".join(to_text[b] for b in token): i for token, i in ranks.items()}
    vocab[EOT] = eot_id
    return vocab


def write_tokenizer(meta, folder, max_length):
    """Tokenizer files transformers' AutoTokenizer loads: GPT-2's for GPT-2 BPE, a tokenizers-library
    tokenizer.json with one token per character for char-level models, and a trained BPE's own tokenizer.json."""
    spec = meta["tokenizer"]
    problems = spec_problems(spec, meta.get("vocab_size"))
    if problems:  # sample.py refuses it too: files of it would read text as ids the model does not have
        raise UserError(f"the checkpoint's tokenizer is unusable ({problems[0]}): no Hugging Face tokenizer can be "
                        "written for it")
    kind = spec["type"]
    # decode text exactly; and no token_type_ids, which transformers 4's PreTrainedTokenizerFast returns by default
    # and GPT-2 adds as the embedding of token 0 at every position (a trial's generate(**tok(text)) went wrong)
    common = {"model_max_length": max_length, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"]}
    if kind == "tiktoken":
        if spec.get("encoding") != "gpt2":
            raise UserError(f"no Hugging Face tokenizer for the tiktoken encoding {spec.get('encoding')!r}: "
                            "export writes GPT-2 BPE and char-level tokenizers only")
        vocab, merges = gpt2_bpe_files()
        _write_text(folder, "vocab.json", vocab)
        _write_text(folder, "merges.txt", merges)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                  "add_prefix_space": False, **common}
    elif kind == "bpe":
        _write_text(folder, "tokenizer.json", spec["tokenizer_json"])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, **common}
    elif kind == "char":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        chars, eot = spec["chars"], spec.get("eot", False)
        vocab = {ch: i for i, ch in enumerate(chars)}
        if eot:
            vocab[EOT] = len(chars)
        tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
        tok.decoder = decoders.Fuse()  # join the characters back with nothing between them
        if eot:
            tok.add_special_tokens([EOT])
        tok.save(os.path.join(folder, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **common}
        if eot:
            config.update(bos_token=EOT, eos_token=EOT)
    else:
        raise UserError(f"no Hugging Face tokenizer for tokenizer type {kind!r}")
    _write_text(folder, "tokenizer_config.json", json.dumps(config, indent=2))


def _write_text(folder, name, text):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(text)


def export_sibling(hf_dir, kind):
    """The folder beside hf_dir an export of this process writes (kind 'partial') or sets the export it replaces
    aside in ('replaced'): named by host and process, so that only this machine's dead ones are taken for leftovers.
    A sibling: the final rename stays on one file system."""
    return f"{os.path.abspath(hf_dir)}.{kind}-export.{socket.gethostname()}.{os.getpid()}"


def remove_killed_exports(hf_dir):
    """Remove the folders an export to hf_dir leaves when it is killed (no handler runs), each as large as a model:
    its partial export, and the export it was replacing, when a kill came between its two renames (hf_dir is gone
    then); only this machine's, whose process has ended, holding only files an export writes. For after an export
    to hf_dir succeeded. Returns their paths."""
    parent, name = os.path.split(os.path.abspath(hf_dir))
    removed = []
    for entry in sorted(os.listdir(parent)):
        found = re.fullmatch(re.escape(name) + r"\.(partial|replaced)-export\.(.+)\.(\d+)", entry)
        path = os.path.join(parent, entry)
        if found and found.group(2) == socket.gethostname() and not process_alive(int(found.group(3))) and \
                os.path.isdir(path) and not os.path.islink(path) and set(os.listdir(path)) <= EXPORT_FILES:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def process_alive(pid):
    """Whether a process of this number runs on this machine (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def save_hf_gpt2(model, meta, hf_dir, dtype="float32"):
    """
    Write `model` (with the tokenizer in `meta`) as a Hugging Face GPT2LMHeadModel folder, weights in `dtype`.
    Everything goes into a temporary sibling folder first and is renamed into place at the end, so a failed export
    never leaves a folder that looks complete. An existing hf_dir is replaced only when it holds nothing but files an
    export writes. Returns the file names written.
    """
    hf_dir = os.path.normpath(hf_dir)
    if os.path.islink(hf_dir):  # the swap below would replace the link with a folder, and leave the link aside
        raise UserError(f"{hf_dir} is a symbolic link: give the folder it points to, "
                        f"--hf_dir={os.path.realpath(hf_dir)}")
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise UserError(f"{hf_dir} is a file, not a folder: choose another --hf_dir")
    if os.path.ismount(hf_dir):  # written beside it and renamed into place: a mount point cannot be (a volume)
        raise UserError(f"{hf_dir} is a mount point, which an export cannot replace: give a folder inside it, "
                        f"--hf_dir={os.path.join(hf_dir, 'model')}")
    if os.path.exists(hf_dir):
        foreign = sorted(set(os.listdir(hf_dir)) - EXPORT_FILES)
        if foreign:
            raise UserError(f"{hf_dir} exists and holds files an export does not write ({', '.join(foreign[:5])}); "
                            "choose a new --hf_dir, or move them away")
    tensors = to_hf_state_dict(model, dtype)  # refuses what GPT-2 cannot express before anything is written
    eot_id = meta.get("eot_id")
    tmp = export_sibling(hf_dir, "partial")
    os.makedirs(tmp)
    try:
        write_tokenizer(meta, tmp, model.config.block_size)
        _write_text(tmp, "config.json", json.dumps(hf_config(model.config, eot_id, dtype), indent=2))
        # max_length: generate() and the pipeline stop at the context, where their defaults (256 new tokens in
        # transformers 5's pipeline) ran past a small model's position table into an IndexError
        _write_text(tmp, "generation_config.json", json.dumps({"bos_token_id": eot_id, "eos_token_id": eot_id,
                                                               "max_length": model.config.block_size}))
        from safetensors.torch import save_file
        try:
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # safetensors' own error type for what is an OSError: a full disk most of all
            for code, words in ((errno.ENOSPC, ("No space left", "StorageFull")), (errno.EDQUOT, ("quota",))):
                if any(w.lower() in str(e).lower() for w in words):
                    raise OSError(code, os.strerror(code), hf_dir) from None
            raise
        umask = os.umask(0)
        os.umask(umask)  # safetensors writes its file for its owner only (0600): give it a new file's usual mode, so
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o666 & ~umask)  # the rest of a shared cluster can read it
        written = sorted(os.listdir(tmp))
        if os.path.exists(hf_dir):  # swap: the old export stays whole until the new one is in place
            old = export_sibling(hf_dir, "replaced")
            os.replace(hf_dir, old)
            os.replace(tmp, hf_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, hf_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return written
