"""
Evaluate a trained model or GPT-2, in numbers that compare with published ones:

    python evaluate.py --out_dir=out --text=notes.txt                      # perplexity of a text file
    python evaluate.py --init_from=gpt2 --dataset=openwebtext --split=val  # perplexity of a prepared split
    python evaluate.py --init_from=gpt2 --task=hellaswag                   # HellaSwag accuracy
    python evaluate.py --out_dir=out --task=val_loss                       # the val loss train.py reported
    torchrun --standalone --nproc_per_node=8 evaluate.py --init_from=gpt2-xl --task=hellaswag

Tasks:
- perplexity: strided sliding windows (as in Hugging Face's "Perplexity of fixed-length models" guide): a window of
  block_size tokens moves `stride` tokens at a time and only the predictions no earlier window made are scored, so
  every token is scored once, with block_size - stride tokens of context or more once the first window is full.
  With an end-of-text token (GPT-2) a text file is scored from its first token, given end-of-text; otherwise from
  its second. Prints tokens scored, mean NLL, perplexity and bits per byte (NLL over the UTF-8 bytes of the scored
  text, comparable across tokenizers).
- hellaswag: the 10,042 validation items (Zellers et al. 2019); each ending is scored by its mean token loss after
  the context, as in the GPT-2 and GPT-3 reports (acc_norm); the summed loss is reported too (acc).
- val_loss: train.py's own estimate for a checkpoint (the same eval_iters batches from the same seed, or the same
  first eval_tokens tokens), from the settings it was trained with. Launched on as many processes as the training run
  it matches it exactly.
Work is spread over the ranks of a torchrun/srun launch. The last line printed is JSON, for scripts.
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import configurator
import hellaswag
from configurator import UserError
from distributed import (all_reduce_sum, cleanup_distributed, detect_launch, fast_kernels, init_distributed,
                         pick_device, pick_dtype)
from inference import load_model, model_label, model_name, model_notes, read_text
from tokendata import Dataset, dataset_dir, first_tokens, window_batch, windows
from tokenizer import mismatch


@dataclass
class EvalConfig:
    init_from: str = "resume"  # 'resume' (out_dir's checkpoint), another checkpoint (a .pt file, or a run's folder holding ckpt.pt), or gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder
    out_dir: str = "out"  # the folder holding ckpt.pt
    task: str = "perplexity"  # 'perplexity', 'hellaswag' or 'val_loss'
    text: str = ""  # perplexity: a file to score: UTF-8 text as one document, or .jsonl/.parquet one document per line or row (as prepare.py reads them)
    text_field: str = "text"  # perplexity: the field of a .jsonl --text, or column of a .parquet one, that holds the text
    dataset: str = ""  # perplexity: a prepared dataset to score instead; val_loss: '' means the checkpoint's own
    data_root: str = "data"  # where prepared datasets live (and the HellaSwag download goes)
    split: str = "val"  # the split of --dataset (perplexity, val_loss)
    block_size: int = 0  # perplexity: window length in tokens; 0: the model's block_size
    stride: int = 0  # perplexity: tokens each window moves on; 0: half the window
    batch_size: int = 8  # windows (perplexity) or items (hellaswag) per forward pass
    source: str = ""  # hellaswag: the validation jsonl; '' downloads it into data_root/hellaswag/
    max_items: int = 0  # hellaswag: score the first N items only; 0: all
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'mps'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'


TASK_KEYS = {"perplexity": {"text", "text_field", "dataset", "split", "block_size", "stride"},
             "val_loss": {"dataset", "split"},
             "hellaswag": {"source", "max_items"}}  # the options each task reads


def validate(cfg):
    problems = []
    if cfg.task not in ("perplexity", "hellaswag", "val_loss"):
        problems.append(f"task={cfg.task!r}: expected perplexity, hellaswag or val_loss")
    if cfg.task == "perplexity" and bool(cfg.text) == bool(cfg.dataset):
        problems.append("perplexity needs one of --text=FILE or --dataset=NAME" +
                        (f", not both (--text={cfg.text}, --dataset={cfg.dataset})" if cfg.text else ""))
    if cfg.task == "perplexity" and cfg.text and cfg.split != EvalConfig.split:  # a file has no splits to choose
        problems.append(f"--split={cfg.split} goes with --dataset, not --text: the whole file is scored")
    problems += configurator.too_small(cfg, ("block_size", "stride", "max_items"), 0)
    if cfg.task in TASK_KEYS:  # an option of another task would be ignored without a word
        for key in sorted(set().union(*TASK_KEYS.values()) - TASK_KEYS[cfg.task]):
            if getattr(cfg, key) != getattr(EvalConfig, key):
                tasks = " or ".join(f"--task={t}" for t, keys in TASK_KEYS.items() if key in keys)
                problems.append(f"--{key} goes with {tasks}, not --task={cfg.task}")
    if cfg.block_size > 0 and cfg.stride > cfg.block_size:
        problems.append(f"stride={cfg.stride} is longer than the window block_size={cfg.block_size}: tokens "
                        "between windows would never be scored")
    problems += configurator.too_small(cfg, ("batch_size",), 1)
    return problems


def token_nll(model, x, y):
    """Negative log-likelihood (B, T) of targets y given inputs x (B, T), 0 where y is -1, in float32."""
    return model(x, y, reduction="none")[1]


@torch.no_grad()
def strided_nll(model, tokens, window, stride, batch_size, device, autocast, launch, progress=False):
    """(summed NLL in nats, tokens scored) of a token sequence (1-D numpy array) over all ranks."""
    plan = windows(len(tokens), window, stride)[launch.rank::launch.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, tokens scored
    batches = range(0, len(plan), batch_size)
    for i in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, file=sys.stderr):
        chunk = plan[i:i + batch_size]
        x, y = window_batch(tokens, chunk, len(chunk), max(end - begin for begin, end, _ in chunk))
        with autocast:
            nll = token_nll(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        total += torch.stack([nll.double().sum(), torch.tensor(float((y >= 0).sum()), device=device)])
    all_reduce_sum(total, launch)
    return total[0].item(), int(total[1].item())


def text_tokens(cfg, tokenizer):
    """The tokens of --text as a prepared split would hold them: end-of-text before each document (GPT-2's start of
    one: its first token is scored too), where the tokenizer has one. A text file is one document; a .jsonl or
    .parquet file one per line or row, read as prepare.py reads them (a trial's .jsonl was scored as its JSON)."""
    from prepare import file_kind, jsonl_documents, parquet_documents
    kind = file_kind(cfg.text)
    if kind == "text":
        docs = [read_text(cfg.text, f"--text={cfg.text}")]
    else:
        if not os.path.isfile(cfg.text):  # as read_text says it of a text file
            what = "a folder" if os.path.isdir(cfg.text) else "no such file"
            raise UserError(f"cannot read --text={cfg.text}: {what}")
        rows = jsonl_documents(cfg.text, cfg.text_field, "strict") if kind == "jsonl" else \
            parquet_documents(cfg.text, cfg.text_field)
        docs = [text for text in rows if text]
        if len(docs) > 1 and tokenizer.eot_id is None:
            raise UserError(f"--text={cfg.text} holds {len(docs):,} documents, but this model's tokenizer has no "
                            "end-of-text token to put between them; score them as one text file")
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    try:
        return np.array([i for doc in docs for i in eot + tokenizer.encode(doc)], dtype=np.int64)
    except UserError as e:  # a character the model's vocabulary lacks
        raise UserError(f"--text={cfg.text}: {e}") from None


def perplexity(cfg, model, tokenizer, device, autocast, launch, say):
    if cfg.text:
        tokens, what = text_tokens(cfg, tokenizer), cfg.text
    else:
        data = open_dataset(cfg.dataset, cfg.data_root, model_name(cfg.init_from, cfg.out_dir), tokenizer)
        shards = data.shards(cfg.split)
        tokens = first_tokens(shards, sum(s.num_tokens for s in shards)).astype(np.int64)
        what = f"{data.data_dir} ({cfg.split})"
    if len(tokens) < 2:
        raise UserError(f"{what} has {len(tokens)} token(s): nothing to score")
    window = cfg.block_size or model.config.block_size
    if window > model.config.block_size:
        raise UserError(f"block_size={window} is longer than the model's context of {model.config.block_size}")
    stride = cfg.stride or max(1, window // 2)
    if stride > window:
        raise UserError(f"stride={stride} is longer than the window of {window} tokens")
    say(f"{what}: {len(tokens):,} tokens, windows of {window} moving {stride} at a time")
    nll, count = strided_nll(model, tokens, window, stride, cfg.batch_size, device, autocast, launch,
                             progress=launch.is_master)
    n_bytes = int(tokenizer.byte_lengths()[tokens[1:]].sum())  # of the scored tokens' text (end-of-text has none)
    mean = nll / count
    result = {"task": "perplexity", "source": what, "tokens": count, "window": window, "stride": stride,
              "nll": mean, "perplexity": math.exp(mean), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1)}
    say(f"tokens scored {count:,} | mean NLL {mean:.4f} | perplexity {result['perplexity']:.3f} | "
        f"bits per byte {result['bits_per_byte']:.4f}")
    return result


def open_dataset(name, data_root, model, tokenizer):
    """The dataset `name`, refused unless tokenized as `model` (what --init_from or --out_dir names) reads."""
    data = Dataset(dataset_dir(name, data_root))
    if data.meta.get("tokenizer") != tokenizer.meta():
        raise UserError(mismatch(model, {"tokenizer": tokenizer.meta(), "vocab_size": tokenizer.vocab_size},
                                 data.data_dir, data.meta))
    return data


def hellaswag_task(cfg, model, tokenizer, device, autocast, launch, say):
    if cfg.source:
        if not os.path.isfile(cfg.source):
            raise UserError(f"--source={cfg.source} " +
                            ("is a folder: name the validation jsonl file in it" if os.path.isdir(cfg.source)
                             else "does not exist"))
        path = cfg.source
    else:
        path = hellaswag.fetch(hellaswag.default_path(cfg.data_root),
                               "offline, point --source at a copy of hellaswag_val.jsonl")
    items, note = hellaswag.first_items(path, cfg.max_items)
    if note:
        say(note)
    mine, note = hellaswag.share(items, tokenizer, path, launch, model.config.block_size)
    if note:
        say(note)
    result = hellaswag.accuracy(model, mine, cfg.batch_size, device, autocast, launch, progress=launch.is_master)
    say(f"hellaswag: {hellaswag.count(result['items'])} | acc_norm (mean token loss) {result['acc_norm']:.4f} | "
        f"acc (summed loss) {result['acc']:.4f}")
    return {"task": "hellaswag", **result}


def val_loss(cfg, sources, model, tokenizer, train_config, device, autocast, launch, say):
    """train.py's estimate_loss over what its evaluations score, with the checkpoint's training settings."""
    from train import estimate_loss, evaluation_sets, saved_config, to_device
    tc = saved_config({"config": train_config})
    if train_config is None:  # GPT-2 weights, trained elsewhere: windows of their whole context, train.py's defaults
        tc = dataclasses.replace(tc, block_size=model.config.block_size)
    if cfg.dataset:
        tc = dataclasses.replace(tc, dataset=cfg.dataset, data_root=cfg.data_root)
    elif "data_root" in sources:  # the run's dataset, moved under another root (given as the default too: a trial)
        tc = dataclasses.replace(tc, data_root=cfg.data_root)
    if tc.block_size > model.config.block_size:
        raise UserError(f"block_size={tc.block_size} of the training settings is longer than the model's "
                        f"{model.config.block_size}")
    data = open_dataset(tc.dataset, tc.data_root, model_name(cfg.init_from, cfg.out_dir), tokenizer)
    # train.py evaluates train and val together, in passes of one shape that both decide: the same passes here
    splits = dict.fromkeys([s for s in ("train", "val") if s in data.splits] + [cfg.split])
    sets, described = evaluation_sets({split: data.shards(split) for split in splits}, tc, launch,
                                      lambda x, y: to_device(x, y, device))
    say(f"{data.data_dir}, {described.replace('evaluation: ', '', 1)}; seed {tc.seed}, on {launch.world_size} "
        "process(es)")
    # the run's own dataset, prepared anew since (as train.py's resume tells it; another --dataset is chosen)
    if cfg.split == "val" and not cfg.dataset and (train_config or {}).get("val_data") not in (
            None, data.fingerprint("val")):
        say(f"note: {data.data_dir}'s val split is not the one the run was evaluated on (its shards' digests differ: "
            "prepared again since?), so this loss is over other tokens than its log's")
    ranks = (train_config or {}).get("processes")
    if not tc.eval_tokens and ranks and ranks != launch.world_size:  # each rank draws its own eval_iters batches
        say(f"note: the run trained on {ranks} processes, each drawing its own evaluation batches; for the number "
            f"its log shows, run this on {ranks} (torchrun --standalone --nproc_per_node={ranks} evaluate.py ...)")
    loss, bpb = estimate_loss(model, sets[cfg.split], autocast, launch,
                              byte_lengths=torch.as_tensor(tokenizer.byte_lengths(), device=device))
    model.eval()  # estimate_loss hands the model back in train mode
    say(f"{cfg.split} loss {loss:.4f}" + (f" ({bpb:.4f} bits per byte)" if bpb is not None else ""))
    return {"task": "val_loss", "split": cfg.split, "loss": loss, "bits_per_byte": bpb, "dataset": data.data_dir,
            "eval_iters": tc.eval_iters, "eval_tokens": tc.eval_tokens, "batch_size": tc.batch_size,
            "block_size": tc.block_size, "processes": launch.world_size}


def main(cfg, sources):
    launch = detect_launch()
    device = init_distributed(launch, pick_device(cfg.device))
    try:
        with fast_kernels(device, "flash")[0]:  # not cuDNN's attention: HellaSwag's shapes change at every batch
            return evaluate(cfg, launch, device, sources)
    finally:
        cleanup_distributed()


def evaluate(cfg, launch, device, sources):
    say = (lambda *a, **k: print(*a, **k, flush=True)) if launch.is_master else (lambda *a, **k: None)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    model, tokenizer, train_config = load_model(cfg.init_from, cfg.out_dir, device)
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))
    say(f"{model_label(cfg.init_from, cfg.out_dir, train_config)}: {model.get_num_params() / 1e6:.2f}M parameters on "
        f"{device} in {dtype}, {launch.world_size} process(es)")
    for note in model_notes(cfg, sources):
        say(note)
    if cfg.task == "perplexity":
        result = perplexity(cfg, model, tokenizer, device, autocast, launch, say)
    elif cfg.task == "hellaswag":
        result = hellaswag_task(cfg, model, tokenizer, device, autocast, launch, say)
    else:
        result = val_loss(cfg, sources, model, tokenizer, train_config, device, autocast, launch, say)
    say(json.dumps({**result, "model": model_name(cfg.init_from, cfg.out_dir),
                    "step": (train_config or {}).get("step")}))
    return result


if __name__ == "__main__":
    configurator.run(main, EvalConfig, validate)
