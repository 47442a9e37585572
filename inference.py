"""
What sample.py and evaluate.py share: the model to run (a training checkpoint or GPT-2 weights) with its tokenizer.

Both use the plain, uncompiled model: generation and evaluation change shapes at every step or batch, which would
make torch.compile recompile again and again for no gain.
"""

from checkpoint import (best_elsewhere, checkpoint_meta, is_checkpoint, load_checkpoint, model_from_checkpoint,
                        step_of)
from configurator import UserError
from tokenizer import tokenizer_from_meta


def model_name(init_from, out_dir):
    """The model an --init_from (and --out_dir, for 'resume') names: what messages call it, and what --init_from or
    prepare.py's --tokenizer would take."""
    return out_dir if init_from == "resume" else init_from


def model_label(init_from, out_dir, train_config):
    """model_name, with the step of the checkpoint read where it is known (load_model's train_config): which of a run's
    saves, the run maybe still training, the figures are from."""
    step = (train_config or {}).get("step")
    return model_name(init_from, out_dir) + (f" (step {step:,})" if step is not None else "")


def model_notes(cfg, sources):
    """What sample.py and evaluate.py say about the model their --init_from and --out_dir name: a run whose best is
    another checkpoint than its latest, and an --out_dir given but not used."""
    notes = [best_elsewhere(model_name(cfg.init_from, cfg.out_dir), "--init_from")]
    if "out_dir" in sources and cfg.init_from != "resume":
        notes.append(f"note: --out_dir={cfg.out_dir} is not used: --init_from={cfg.init_from} names the model")
    return [note for note in notes if note]


def load_model(init_from, out_dir, device):
    """
    (model in eval mode on `device`, tokenizer, the training config dict or None) for init_from 'resume' (the
    checkpoint in out_dir), another checkpoint (a .pt file, or a run's folder holding ckpt.pt, as train.py takes), or
    GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local Hugging Face folder). The config carries what
    the checkpoint tells of its run besides, where it does: 'processes' (their number: one random state each),
    'val_data' (the val shards' digests, Dataset.fingerprint) and 'step' (which of a live run's saves was read).
    """
    if init_from == "resume" or is_checkpoint(init_from):
        where = model_name(init_from, out_dir)
        checkpoint = load_checkpoint(where)
        model = model_from_checkpoint(checkpoint, where, dropout=0.0)
        meta, train_config = checkpoint_meta(checkpoint, where), checkpoint.get("config")
        if train_config is not None:
            told = {"processes": len(checkpoint.get("rng") or []) or None,
                    "val_data": checkpoint.get("val_data") or None, "step": step_of(checkpoint)}
            train_config = {**train_config, **{k: v for k, v in told.items() if v is not None}}
    else:
        model, meta = load_gpt2(init_from)
        train_config = None
    return model.eval().to(device), tokenizer_from_meta(meta), train_config


def read_text(path, what):
    """A UTF-8 text file (a prompt, a text to score) as prepare.py reads one: line endings as they are (a Windows
    file's carriage returns kept), a leading byte-order mark dropped; `what` names it in the one-line error."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read {what}: byte {e.start:,} is not UTF-8; convert the file to UTF-8") from None


def read_prompt(start, flag="--start"):
    """A prompt as given on the command line: the text itself, or FILE:path to read it from a file."""
    return read_text(start[5:], f"the {flag} file {start[5:]}") if start.startswith("FILE:") else start


def prompt_ids(tokenizer, prompt, flag="--start"):
    """The token ids a sample continues: the prompt's, or the end-of-text token for an empty prompt (GPT-2 starts
    each document after one). flag names the prompt in errors: the option, or the option and its FILE:path."""
    try:
        ids = tokenizer.encode(prompt)
    except UserError as e:  # a character-level model cannot read a character it never saw
        escaped = "; the text is taken as it is: for a newline, type one ($'a\\nb' in bash) or use FILE:path" \
            if "\\n" in prompt else ""
        raise UserError(f"{flag}: {e}{escaped}") from None
    if ids:
        return ids
    if tokenizer.eot_id is None:
        raise UserError(f"{flag} is empty and this tokenizer has no end-of-text token to start from; give "
                        f"{flag.split('=')[0]}=\"some text\"")
    return [tokenizer.eot_id]


def load_gpt2(name_or_path):
    """GPT-2 weights and the meta of their tokenizer (GPT-2 BPE, or the char-level one export.py writes for a
    character model) through hf.py, imported only here: it pulls in the Hugging Face libraries."""
    from hf import hf_tokenizer_meta, load_hf_gpt2
    meta = hf_tokenizer_meta(name_or_path)
    return load_hf_gpt2(name_or_path), meta
