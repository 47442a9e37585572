"""
Checkpoint files: the one save/load pair every script uses.

A checkpoint is a torch.save'd dict with at least
    format       CHECKPOINT_FORMAT
    model        the model's state dict (no `_orig_mod.` / `module.` prefixes)
    model_args   the GPTConfig fields
    meta         the dataset's meta (tokenizer, vocab_size, eot_id), so sampling decodes with the right tokenizer
and, from train.py, optimizer, step, best_val_loss, config, rng states and the batch sampler's state.
Writes are whole-or-not-at-all: a temporary file in the same folder, fsync'ed, renamed over the old one.
"""

import os

import torch

from configurator import UserError

CHECKPOINT_FORMAT = 1
# what torch.compile and DistributedDataParallel put in front of parameter names
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(UserError):
    pass


def clean_state_dict(state_dict):
    """A state dict without the prefixes of compiled or DDP-wrapped models (older files may carry them)."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    return cleaned


def unwrap_model(model):
    """The plain GPT inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` to `path` atomically: either the old file or the complete new one is there, never half."""
    checkpoint = {"format": CHECKPOINT_FORMAT, **checkpoint}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # make the rename itself durable (a power cut right after could otherwise lose it on some file systems)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint (or an older nanoGPT ckpt.pt), with clear errors when it is not one."""
    if os.path.isdir(path) or not path.endswith(".pt"):  # an out_dir
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py ...) or check --out_dir")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a truncated or garbled zip archive
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise CheckpointError(f"{path} is not a GPT checkpoint (no model weights and model_args in it)")
    checkpoint["model"] = clean_state_dict(checkpoint["model"])
    return checkpoint


def model_from_checkpoint(checkpoint, **overrides):
    """Rebuild the GPT a checkpoint holds (on CPU, in float32); `overrides` change GPTConfig fields such as dropout."""
    from model import GPT, GPTConfig
    fields = GPTConfig.__dataclass_fields__
    args = {k: v for k, v in checkpoint["model_args"].items() if k in fields}
    args.update(overrides)
    model = GPT(GPTConfig(**args))
    state = dict(checkpoint["model"])
    rows = model.config.padded_vocab_size
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in state and state[key].size(0) < rows:  # nanoGPT's char checkpoints keep an unpadded vocabulary
            pad = state[key].new_zeros(rows - state[key].size(0), state[key].size(1))
            state[key] = torch.cat([state[key], pad])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit its model_args: {e}") from None
    return model
