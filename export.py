"""
Hand a trained model to the Hugging Face ecosystem (transformers, lm-evaluation-harness, vLLM, the Hub):

    python export.py --out_dir=out-shakespeare-char --hf_dir=hf-shakespeare-char

writes a GPT2LMHeadModel folder: config.json, model.safetensors (float32, or half the size with --dtype=bfloat16 or
float16), generation_config.json and the tokenizer (GPT-2's for GPT-2 BPE models, a one-token-per-character
tokenizer.json for char-level ones). Then, with no code of ours:

    transformers.pipeline("text-generation", model="hf-shakespeare-char")("ROMEO:", max_new_tokens=50)

The weight mapping lives in hf.py.
"""

import os
from dataclasses import dataclass

import configurator
from checkpoint import best_elsewhere, checkpoint_meta, load_checkpoint, model_from_checkpoint
from hf import EXPORT_DTYPES, remove_killed_exports, save_hf_gpt2
from tokenizer import describe


@dataclass
class ExportConfig:
    out_dir: str = "out"  # the folder holding ckpt.pt
    hf_dir: str = ""  # the Hugging Face folder to write; empty: <out_dir>-hf (<run>-<checkpoint>-hf for a .pt)
    dtype: str = "float32"  # of the weights written: 'float32' (exact), 'bfloat16' or 'float16' (half the size)


def validate(cfg):
    if cfg.dtype not in EXPORT_DTYPES:
        return [f"dtype={cfg.dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}"]
    return []


def named_folder(path):
    """A folder's path with its own name at the end: '.' or '..' (from inside a run) become the absolute path, whose
    name an export's folder beside it can take ('.-hf' would be a hidden folder inside the run)."""
    path = os.path.normpath(path)
    return os.path.abspath(path) if os.path.basename(path) in (".", "..") else path


def main(cfg, sources):
    if cfg.hf_dir:
        hf_dir = cfg.hf_dir
    elif cfg.out_dir.endswith(".pt"):  # out/ckpt_00002000.pt: out-ckpt_00002000-hf, beside the run, not inside it
        run, name = os.path.split(os.path.normpath(cfg.out_dir))
        hf_dir = f"{named_folder(run or '.')}-{name[:-3]}-hf"
    else:
        hf_dir = named_folder(cfg.out_dir) + "-hf"
    checkpoint = load_checkpoint(cfg.out_dir)
    meta = checkpoint_meta(checkpoint, cfg.out_dir)
    model = model_from_checkpoint(checkpoint, cfg.out_dir)
    del checkpoint
    files = save_hf_gpt2(model, meta, hf_dir, cfg.dtype)
    for path in remove_killed_exports(hf_dir):  # now that this one is whole: a leftover may be the only export
        print(f"note: removed {path}, what an export killed before it finished left")
    c = model.config
    kind = "GPT-2 BPE" if meta["tokenizer"]["type"] == "tiktoken" else describe(meta["tokenizer"])
    print(f"wrote {hf_dir}: GPT-2 with n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
          f"context {c.block_size}, vocab {c.vocab_size} ({kind}), {cfg.dtype} weights"
          f"{'' if c.bias else ', zero biases for bias=False'}")
    print(f"files: {', '.join(files)}")
    note = best_elsewhere(cfg.out_dir, "--out_dir")
    if note:
        print(note)
    print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({hf_dir!r}), "
          f"AutoTokenizer.from_pretrained({hf_dir!r})")


if __name__ == "__main__":
    configurator.run(main, ExportConfig, validate)
