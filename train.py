"""
Train a GPT on a prepared dataset. One process, or many under torchrun or Slurm's srun, with the same command:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
    srun python train.py config/gpt2_124m.py            (inside an sbatch job; see slurm/train.sbatch)

Settings are the TrainConfig fields below; `python train.py --help` lists them. A run can be stopped at any step
boundary (SIGTERM, SIGUSR1, max_runtime) and resumed exactly: the checkpoint holds everything the next step needs.
"""

import dataclasses
import difflib
import errno
import importlib.util
import io
import json
import math
import os
import random
import shutil
import signal
import stat
import statistics
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed

import configurator
import hellaswag
from checkpoint import (BEST, Writer, best_linked, checkpoint_meta, is_checkpoint, kept_for_good, load_checkpoint,
                        model_from_checkpoint, save_training_checkpoint, saved_step, snapshot, step_checkpoints,
                        step_of, unfinished_files)
from configurator import UserError
from distributed import (ATTENTION_CHOICES, BACKENDS, DTYPES, all_reduce_sum, cleanup_distributed, detect_launch,
                         fast_kernels, init_distributed, pick_device, pick_dtype)
from generate import TEMPERATURE, TOP_K, Stop, generate
from hf import GPT2_NAMES, check_dataset_tokenizer, fit_context, load_hf_gpt2, pretrained_config
from inference import prompt_ids, read_prompt
from lock import FolderLock
from model import GPT2_OPTIONS, MLP_KINDS, NORMS, GPT, GPTConfig, head_problems, peak_flops_for
from tokendata import SAMPLERS, BatchSampler, Dataset, EpochSampler, dataset_dir, first_tokens, window_batch, windows
from tokenizer import mismatch, tokenizer_from_meta

# exit code after saving on SIGTERM/SIGUSR1 or max_runtime: "not finished, run me again" (slurm/train.sbatch requeues)
EXIT_REQUEUE = 3
EXIT_INTERRUPTED = 130  # after saving on Ctrl-C: the shell's code for SIGINT, which no requeue script mistakes for 3


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints, log.jsonl and loss.png go here
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt.pt), 'auto' (resume if there is one), or weights to start from: gpt2[-medium|-large|-xl], a Hugging Face folder, or a checkpoint of this toolkit (a .pt file, or a folder holding ckpt.pt)
    eval_interval: int = 2000  # steps between val-loss evaluations (and checkpoints)
    eval_iters: int = 200  # random batches per split in each evaluation (the same ones every time)
    eval_tokens: int = 0  # instead of eval_iters: each split's first eval_tokens tokens (all of a smaller split), every one but the first predicted once in consecutive windows of block_size; exact, and cheaper where the split is small
    eval_batch_size: int = 0  # most sequences per evaluation forward pass, a multiple of batch_size (0: batch_size); the same sequences are evaluated whatever it is, fewer passes are faster
    hellaswag: bool = False  # at each evaluation, also score HellaSwag (acc_norm, as GPT-2 is compared): its validation jsonl, downloaded into data_root/hellaswag/ once (offline: put it there), spread over the ranks
    hellaswag_items: int = 0  # score the first N items only; 0: all 10,042
    eval_only: bool = False  # evaluate once, print the losses (the last line is JSON) and exit, writing nothing to out_dir
    log_interval: int = 1  # steps between log lines
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves; False: such a save is also best.pt, which ckpt.pt's other saves, for resuming (save_interval, a stop signal, max_runtime), leave alone
    save_interval: int = 0  # also save every this many steps between evaluations, without evaluating (against losing work to a crash that gives no signal); 0: at evaluations only
    async_save: bool = True  # write checkpoints and loss.png on a background thread while training goes on; the checkpoint being written is held in CPU memory meanwhile (False: training waits for each write)
    keep_last_n: int = 2  # numbered checkpoints ckpt_<step>.pt kept besides ckpt.pt (the latest)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, for good; 0: none
    max_runtime: str = ""  # save and exit (code 3) after this wall time: '3:55:00', '55:00', '90' (seconds), or with days as Slurm writes them, '1-12' (1 day 12 hours), '1-12:30:00'; empty or 0: no limit
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient before the run stops
    skip_spikes: float = 0.0  # skip an update whose loss or gradient norm is more than this many standard deviations above the mean of the last spike_window steps' (llm.c's -sl and -sg; 5 is a usual choice); 0: never
    spike_window: int = 128  # steps in that mean
    plot: bool = True  # redraw out_dir/loss.png (train and val loss against tokens) at every eval
    sample_tokens: int = 0  # at each evaluation after step 0, rank 0 prints a sample of up to this many new tokens (also appended to log.jsonl); 0: none
    sample_start: str = "\n"  # the samples' prompt, or FILE:path (empty: end-of-text); drawn as sample.py draws, from the same seed each time, so they differ only as the model does
    seed: int = 1337
    # wandb
    wandb_log: bool = False  # WANDB_MODE=offline works without network
    wandb_project: str = "gpt"
    wandb_run_name: str = ""  # empty: the out_dir's folder name, which tells a sweep's runs apart
    # data
    dataset: str = "openwebtext"  # a folder under data_root (or a path to a prepared dataset)
    data_root: str = "data"
    batch_size: int = 12  # sequences per micro-step per process
    block_size: int = GPTConfig.block_size  # tokens per sequence
    total_batch_size: int = 0  # tokens per optimizer step over all processes; 0: use gradient_accumulation_steps
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, summed over all processes (as nanoGPT)
    data_order: str = "random"  # 'random': windows at random places, with replacement (nanoGPT's); 'epochs': every block_size window of the train split once per epoch, shuffled anew each epoch (llm.c's and build-nanogpt's one pass); 'one_batch': the same batch every step, a debugging check (the loss should fall close to 0)
    # model
    n_layer: int = GPTConfig.n_layer
    n_head: int = GPTConfig.n_head
    n_embd: int = GPTConfig.n_embd
    dropout: float = GPTConfig.dropout  # 0 for pretraining, try 0.1+ for fine-tuning
    bias: bool = GPTConfig.bias  # biases in Linear and LayerNorm layers, as GPT-2
    rope: bool = GPTConfig.rope  # rotary position embeddings (as LLaMA, nanochat) instead of GPT-2's learned position table; such a model cannot be exported to Hugging Face GPT-2
    qk_norm: bool = GPTConfig.qk_norm  # RMS-normalise each head's queries and keys (nanochat, modded-nanogpt): bounded attention logits; not exportable to GPT-2
    mlp: str = GPTConfig.mlp  # the MLP's nonlinearity: 'gelu' (GPT-2's) or 'relu2' (ReLU squared: Primer, nanochat); relu2 is not exportable to GPT-2
    tie_embeddings: bool = GPTConfig.tie_embeddings  # the output layer is the token embedding matrix, as GPT-2; False: its own (nanochat), which the parameter count then leaves out like the position table; not exportable to GPT-2
    n_kv_head: int = GPTConfig.n_kv_head  # heads of keys and values, each shared by n_head/n_kv_head query heads (grouped-query attention; 1: multi-query): a smaller KV cache for sampling; 0 (or n_head itself, which becomes 0): n_head, as GPT-2; fewer is not exportable to GPT-2
    norm: str = GPTConfig.norm  # 'layernorm' (GPT-2's) or 'rmsnorm' (RMSNorm with no learned gain: nanochat, modded-nanogpt); rmsnorm is not exportable to GPT-2
    logit_softcap: float = GPTConfig.logit_softcap  # > 0: soft-cap the logits at this value, c·tanh(logits/c) (Gemma 2; nanochat uses 15); 0: off, as GPT-2; not exportable to GPT-2
    embed_norm: bool = GPTConfig.embed_norm  # normalise the input embeddings (with `norm`) before the first block, as nanochat; not exportable to GPT-2
    # optimizer
    optimizer: str = "adamw"  # 'adamw', or 'muon': Muon (torch.optim.Muon) for the blocks' weight matrices and AdamW for embeddings, gains and biases, at the same learning_rate and weight_decay (Muon's updates are scaled to AdamW's size)
    learning_rate: float = 6e-4  # peak learning rate
    max_iters: int = 600000  # optimizer steps in all
    max_tokens: int = 0  # the run's length in tokens instead, over all processes: max_iters becomes the steps that reach it (the last step may pass it); 0: max_iters decides
    tokens_per_param: float = 0.0  # the run's length as tokens per parameter of the model (the count train.py prints; about 20 is Chinchilla's compute-optimal ratio): max_tokens = this x that count; 0: off
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip gradients at this global norm; 0 disables
    # learning-rate schedule: linear warmup, decay to min_lr at lr_decay_iters, then constant
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 0  # the step the decay ends at; 0: max_iters, the schedule ending with the run (as in the Chinchilla paper)
    min_lr: float = 6e-5  # about learning_rate / 10
    lr_schedule: str = "cosine"  # the decay: 'cosine', 'linear', or 'wsd' (warmup-stable-decay: learning_rate until the last cooldown_frac of lr_decay_iters, then linear; a run at its stable rate can be extended, or cooled down from a checkpoint)
    cooldown_frac: float = 0.2  # wsd: the share of lr_decay_iters spent decaying
    # system
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    backend: str = "auto"  # torch.distributed's backend under torchrun or srun: 'auto' (nccl on CUDA, gloo otherwise), 'nccl' or 'gloo' (nanoGPT's key)
    dtype: str = "auto"  # 'auto' (bfloat16 where supported, else float16 on CUDA, float32 elsewhere), 'float32', 'bfloat16', 'float16'
    compile: bool | None = None  # torch.compile the model; None: on for CUDA only
    compile_mode: str = "default"  # torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs: for small, launch-bound models), 'max-autotune', 'max-autotune-no-cudagraphs'
    shard_optimizer: bool = False  # ZeRO-1 (torch's ZeroRedundancyOptimizer): each process keeps AdamW's state for its share of the parameters only, 8 bytes a parameter over all processes instead of on each; the same updates; several processes only
    recompute: bool = False  # activation checkpointing: recompute each block's activations in the backward pass instead of keeping them, for larger batches or models in the same memory at about a third more compute; the same gradients
    fused_loss: bool = False  # the output layer and loss in chunks (model.LinearCrossEntropy): less memory (GPT-2 small, batch 32, H100: 15.6 instead of 21.3 GiB) but slower (79.5 instead of 71.2 ms/step, measured before its products were aligned)
    attention: str = "auto"  # CUDA attention kernel tried first: 'auto' (cudnn on Hopper and newer, else flash), 'cudnn', 'flash', 'efficient', 'math', 'default' (PyTorch's order)
    peak_flops: float = 0.0  # the device's peak FLOP/s for MFU; 0: look the GPU up in model.PEAK_FLOPS_BF16

    def __post_init__(self):
        if self.n_kv_head == self.n_head:  # GPT-2's attention, as GPTConfig writes it: n_kv_head=0
            self.n_kv_head = 0


# the model's settings: every GPTConfig field but the vocabulary's size, which the dataset gives. Each is a TrainConfig
# field of the same name (and default), which model_config passes on: a field added to GPTConfig alone would be
# neither settable nor saved
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size")
if set(MODEL_KEYS) - set(TrainConfig.__dataclass_fields__):  # a fork's new field: settable once it is here too
    raise TypeError(f"model.py's GPTConfig fields {sorted(set(MODEL_KEYS) - set(TrainConfig.__dataclass_fields__))} "
                    "need a field each, of the same name, in train.py's TrainConfig")
# what must match between a checkpoint and the run that resumes it; everything else may change (and is reported)
SHAPE_KEYS = tuple(k for k in MODEL_KEYS if k != "dropout")
LR_SCHEDULES = ("cosine", "linear", "wsd")
SCHEDULE_KEYS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "lr_schedule", "cooldown_frac")
DATA_ORDERS = {"random": "windows drawn at random, with replacement", "epochs": "each window once per epoch, shuffled",
               "one_batch": "one batch, the same every step: its loss should fall close to 0; a check, not training"}
OPTIMIZER_NAMES = {"adamw": "AdamW", "muon": "Muon for the blocks' weight matrices, AdamW for the rest"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate(cfg):
    """Every cross-field problem of a TrainConfig, all at once, before any work."""
    problems = configurator.too_small(cfg, ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_interval",
                                            "log_interval", "gradient_accumulation_steps", "max_bad_steps") +
                                      (() if cfg.eval_tokens else ("eval_iters",)), 1)  # unused with eval_tokens
    problems += head_problems(cfg.n_embd, cfg.n_head, cfg.rope, cfg.n_kv_head)
    if not cfg.dataset.strip():  # else the data root itself was taken for the dataset's folder
        problems.append("dataset='' names no dataset: give --dataset=NAME (prepared under data_root) or its folder")
    if cfg.skip_spikes < 0:
        problems.append(f"skip_spikes={cfg.skip_spikes} must be 0 (off) or a number of standard deviations")
    if cfg.spike_window < 2:
        problems.append(f"spike_window={cfg.spike_window} must be at least 2 (a standard deviation needs two steps)")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout={cfg.dropout} must be in [0, 1)")
    if cfg.init_from.endswith(".pt") and not os.path.isfile(cfg.init_from):
        problems.append(f"init_from={cfg.init_from!r}: no such checkpoint file")
    elif cfg.init_from not in ("scratch", "resume", "auto", *GPT2_NAMES) and not os.path.isdir(cfg.init_from) \
            and not cfg.init_from.endswith(".pt"):
        close = difflib.get_close_matches(cfg.init_from, ["scratch", "resume", "auto", *GPT2_NAMES], n=1)
        problems.append(f"init_from={cfg.init_from!r}: expected 'scratch', 'resume', 'auto', "
                        f"{', '.join(GPT2_NAMES)}, a Hugging Face GPT-2 folder or a checkpoint (a .pt file, or a "
                        f"folder holding ckpt.pt){f'; did you mean {close[0]!r}?' if close else ''}")
    if cfg.mlp not in MLP_KINDS:
        problems.append(f"mlp={cfg.mlp!r}: expected {', '.join(map(repr, MLP_KINDS))}")
    if cfg.backend not in BACKENDS:
        problems.append(f"backend={cfg.backend!r}: expected {', '.join(map(repr, BACKENDS))}")
    if cfg.norm not in NORMS:
        problems.append(f"norm={cfg.norm!r}: expected {', '.join(map(repr, NORMS))}")
    if cfg.attention not in ATTENTION_CHOICES:
        problems.append(f"attention={cfg.attention!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    if cfg.compile_mode not in COMPILE_MODES:
        problems.append(f"compile_mode={cfg.compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if cfg.eval_tokens < 0:
        problems.append(f"eval_tokens={cfg.eval_tokens} must be 0 (eval_iters random batches) or more")
    if cfg.batch_size >= 1 and cfg.eval_batch_size % cfg.batch_size:
        problems.append(f"eval_batch_size={cfg.eval_batch_size} is not a multiple of batch_size={cfg.batch_size}")
    if cfg.data_order not in SAMPLERS:
        problems.append(f"data_order={cfg.data_order!r}: expected {', '.join(map(repr, SAMPLERS))}")
    if cfg.dtype not in DTYPES:
        problems.append(f"dtype={cfg.dtype!r}: expected {', '.join(DTYPES)}")
    if cfg.max_tokens and cfg.tokens_per_param:
        problems.append(f"max_tokens={cfg.max_tokens} and tokens_per_param={cfg.tokens_per_param} both give the "
                        "run's length: keep one")
    if cfg.decay_lr and 0 < cfg.lr_decay_iters < cfg.warmup_iters:
        problems.append(f"lr_decay_iters={cfg.lr_decay_iters} is shorter than warmup_iters={cfg.warmup_iters}: lower "
                        f"--warmup_iters (to {max(cfg.lr_decay_iters // 10, 1)}, say), or leave lr_decay_iters out "
                        "(0: the schedule ends with the run, and a run shorter than its warmup is all warmup)")
    if cfg.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule={cfg.lr_schedule!r}: expected {', '.join(map(repr, LR_SCHEDULES))}")
    if cfg.optimizer not in OPTIMIZER_NAMES:
        problems.append(f"optimizer={cfg.optimizer!r}: expected {', '.join(map(repr, OPTIMIZER_NAMES))}")
    elif cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        problems.append(f"optimizer=muon needs torch.optim.Muon, from PyTorch 2.9 on (this is {torch.__version__})")
    if not 0.0 < cfg.cooldown_frac <= 1.0:
        problems.append(f"cooldown_frac={cfg.cooldown_frac} must be in (0, 1]")
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:  # unused without decay (nanoGPT's fine-tuning config)
        problems.append(f"min_lr={cfg.min_lr} is above learning_rate={cfg.learning_rate}")
    # a negative grad_clip or learning rate would not fail: it would turn the updates around, and the loss go up
    problems += configurator.too_small(cfg, ("total_batch_size", "hellaswag_items", "max_iters", "keep_last_n",
                                             "keep_every", "save_interval", "sample_tokens", "grad_clip",
                                             "learning_rate", "min_lr", "weight_decay", "warmup_iters",
                                             "lr_decay_iters", "peak_flops", "seed", "max_tokens",
                                             "tokens_per_param", "logit_softcap"), 0)
    if min(cfg.batch_size, cfg.block_size, cfg.gradient_accumulation_steps) >= 1 and cfg.total_batch_size >= 0:
        try:  # the batch arithmetic, for the number of processes this launch has
            micro_steps_per_rank(cfg, detect_launch().world_size)
        except UserError as e:
            problems.append(str(e))
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            problems.append(f"{key}={getattr(cfg, key)} must be in [0, 1)")
    if not cfg.out_dir:
        problems.append("out_dir is empty: name the folder for checkpoints and logs")
    elif os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        problems.append(f"out_dir={cfg.out_dir!r} is a file, not a folder")
    try:
        parse_duration(cfg.max_runtime)
    except ValueError as e:
        problems.append(str(e))
    return problems


def model_config(cfg, vocab_size):
    """The GPTConfig of a model trained from scratch with these settings."""
    return GPTConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_KEYS})


# set by slurm/train.sbatch: a run whose out_dir holds its checkpoint resumes it, whatever --init_from says
RESUME_VARIABLE = "GPT_RESUME_RUN"
IMPROVED = "val loss improved"
FIRST_VAL = "first val loss measured"  # of the run, or since a resume that changed what the val loss is measured on
SOURCE_RANK = {None: 0, "command line": 2}  # a config file's: 1


def run_length(cfg, sources, tokens_per_step, done, tokens_done, count_params, say):
    """
    The run's length and the schedule's end, as (cfg, sources, how the length was given). max_tokens or
    tokens_per_param sets max_iters, unless max_iters comes from a later word (the command line over a config file);
    the steps are counted from the checkpoint's tokens, at this run's tokens per step. lr_decay_iters=0 becomes
    max_iters (a run shorter than its warmup is all warmup, with a note); one given where the run's length was given
    earlier is kept, with a note when the two differ.
    """
    def rank(key):
        return SOURCE_RANK.get(sources.get(key), 1)
    by, how = "max_tokens" if cfg.max_tokens else "tokens_per_param" if cfg.tokens_per_param else None, ""
    length_rank, length_source = rank("max_iters"), sources.get("max_iters")
    if by:
        steps_rank, tokens_rank = length_rank, rank(by)
        if steps_rank == tokens_rank:  # two on the command line, or in config files (of one rank: keep it simple)
            raise UserError(f"the run's length is given twice, max_iters={cfg.max_iters} ({sources['max_iters']}) "
                            f"and {by}={getattr(cfg, by)} ({sources[by]}): keep one")
        if steps_rank > tokens_rank:
            say(f"note: {by}={getattr(cfg, by)} ({sources[by]}) is not used: max_iters ({sources['max_iters']}) "
                "gives the run's length")
        else:
            target = cfg.max_tokens
            how = f"max_tokens={target:,}"
            if by == "tokens_per_param":
                params = count_params()
                target = math.ceil(cfg.tokens_per_param * params)
                how = f"tokens_per_param={cfg.tokens_per_param:g} x {params:,} parameters"
            steps = done + math.ceil(max(target - tokens_done, 0) / tokens_per_step)
            if "max_iters" in sources:
                say(f"note: max_iters={cfg.max_iters} ({sources['max_iters']}) gives way to {by} ({sources[by]})")
            cfg, sources, length_rank, length_source = dataclasses.replace(cfg, max_iters=steps), \
                {**sources, "max_iters": by}, tokens_rank, sources[by]
    if not cfg.decay_lr:
        return cfg, sources, how
    if cfg.lr_decay_iters == 0:
        if cfg.max_iters < cfg.warmup_iters:
            peak = lr_at(cfg.max_iters - 1, cfg) / cfg.learning_rate if cfg.learning_rate else 1.0
            say(f"note: the run ends inside its warmup (max_iters={cfg.max_iters}, warmup_iters={cfg.warmup_iters}): "
                f"the learning rate only rises, to {peak:.0%} of learning_rate at the last step, and never decays")
        return (dataclasses.replace(cfg, lr_decay_iters=max(cfg.max_iters, cfg.warmup_iters)),
                {**sources, "lr_decay_iters": "max_iters" if cfg.max_iters >= cfg.warmup_iters else "warmup_iters"},
                how)
    if cfg.lr_decay_iters != cfg.max_iters and (rank("lr_decay_iters") < length_rank or (
            rank("lr_decay_iters") == length_rank == 1 and sources["lr_decay_iters"] != length_source)):
        past = cfg.lr_decay_iters > cfg.max_iters
        say(f"note: the schedule ends at lr_decay_iters={cfg.lr_decay_iters} ({sources['lr_decay_iters']}), not at "
            f"the run's end (max_iters={cfg.max_iters}{f', from {how}' if how else ''}): " +
            ("the run stops before the learning rate is down to min_lr" if past else
             f"the last {cfg.max_iters - cfg.lr_decay_iters:,} steps are at min_lr") +
            "; --lr_decay_iters=0 ends it with the run")
    return cfg, sources, how


def parse_duration(text):
    """
    A wall time -> seconds ('' or 0 -> None: no limit): hours:minutes:seconds ('3:55:00'), minutes:seconds
    ('55:00'), seconds ('90': Slurm's --time would read minutes), or with days as Slurm writes them, the clock then
    read from the hours: days-hours ('1-5'), days-hours:minutes ('1-5:30'), days-hours:minutes:seconds ('1-05:30:00').
    """
    if not text:
        return None
    days, dash, clock = text.rpartition("-")
    try:
        parts = [float(p) for p in clock.split(":")]
        if len(parts) > 3 or not all(0 <= p < math.inf for p in parts) or (dash and not days.isdigit()):
            raise ValueError
        if dash:
            parts += [0.0] * (3 - len(parts))  # after days, the first field is hours (Slurm's reading)
        seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts))) + (int(days) * 86400 if days else 0)
        return seconds or None  # 0: no limit, as 0 turns off the toolkit's other limits (a trial's stopped at once)
    except ValueError:
        raise ValueError(f"max_runtime={text!r}: expected [days-]hours:minutes:seconds such as 3:55:00") from None


def saved_config(checkpoint):
    """The TrainConfig a checkpoint's run had (its keys this version knows; the defaults for those it lacks)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in (checkpoint.get("config") or {}).items() if k in known})


def lr_at(step, cfg):
    """
    Learning rate at an optimizer step: linear warmup from 0 over warmup_iters, then from learning_rate down to min_lr
    at lr_decay_iters (cosine or linear from the end of warmup; wsd holds learning_rate until the last cooldown_frac
    of lr_decay_iters, then decays linearly), then min_lr.
    """
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    start = cfg.warmup_iters
    if cfg.lr_schedule == "wsd":
        start = max(start, round(cfg.lr_decay_iters * (1 - cfg.cooldown_frac)))
    progress = max(0, step - start) / max(1, cfg.lr_decay_iters - start)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def micro_steps_per_rank(cfg, world_size):
    """Gradient-accumulation micro-steps of each process per optimizer step, and the arithmetic behind it."""
    tokens_per_micro = cfg.batch_size * cfg.block_size * world_size
    if cfg.total_batch_size:
        if cfg.total_batch_size % tokens_per_micro:
            raise UserError(f"total_batch_size={cfg.total_batch_size:,} tokens is not a multiple of batch_size "
                            f"{cfg.batch_size} x block_size {cfg.block_size} x {world_size} processes = "
                            f"{tokens_per_micro:,}; change one of them")
        steps = cfg.total_batch_size // tokens_per_micro
    else:
        if cfg.gradient_accumulation_steps % world_size:
            raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                            f"{world_size} processes; use a multiple of {world_size} or set total_batch_size")
        steps = cfg.gradient_accumulation_steps // world_size
    explain = (f"{cfg.batch_size} sequences x {cfg.block_size} tokens x {world_size} processes x {steps} micro-steps"
               f" = {tokens_per_micro * steps:,} tokens per optimizer step")
    return steps, explain


@torch.no_grad()
def estimate_loss(model, batches, autocast, launch, stopping=None, byte_lengths=None):
    """
    (mean loss, bits per byte) of `model` over the targets (those not -1) of (x, y) batches on every rank, in eval
    mode: one all-reduce, one sync at the end. Bits per byte, given byte_lengths (each id's UTF-8 bytes, a tensor on
    the model's device: Tokenizer.byte_lengths), are the loss in bits over the bytes of the text the targets stand
    for, which compares models of any tokenizer (a char model with a BPE one); else None. None instead of the pair
    when `stopping()` (a host-side check, made before each batch) said to give up on any rank: every rank then
    returns None, so they go on alike (a Ctrl-C need not wait for a long evaluation).
    """
    device = next(model.parameters()).device
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    n_bytes = torch.zeros((), dtype=torch.long, device=device)
    abandoned = False
    for x, y in batches:
        if stopping is not None and stopping():
            abandoned = True
            break
        with autocast:
            _, nll = model(x, y, reduction="none")
        total = total + nll.float().sum()  # a new tensor: a CUDA graph may reuse `nll` on the next call
        count = count + (y >= 0).sum()
        if byte_lengths is not None:
            n_bytes = n_bytes + (byte_lengths[y.clamp(min=0)] * (y >= 0)).sum()
    model.train()
    sums = all_reduce_sum(torch.stack([total, count.float(), n_bytes.float(),
                                       torch.tensor(float(abandoned), device=device)]), launch)
    total, count, n_bytes, abandoned = sums.tolist()
    return None if abandoned else (total / count, total / math.log(2) / n_bytes if n_bytes else None)


class EvalBatches:
    """The same eval_iters batches of a split at every evaluation: a generator reseeded each time, apart from the
    training sampler, so evaluating (or changing eval_interval) never changes which batches training sees."""

    def __init__(self, shards, cfg, launch, per_pass, to_device):
        self.shards, self.cfg, self.launch, self.per_pass, self.to_device = shards, cfg, launch, per_pass, to_device

    def __iter__(self):
        sampler = BatchSampler(self.shards, self.cfg.block_size, self.cfg.batch_size, seed=[self.cfg.seed, 1],
                               rank=self.launch.rank, world_size=self.launch.world_size)
        for _ in range(self.cfg.eval_iters // self.per_pass):
            parts = [sampler.next_batch() for _ in range(self.per_pass)]
            yield self.to_device(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))


def batches_per_pass(eval_iters, most):
    """
    How many batches each evaluation forward pass joins (the same sequences, fewer kernel launches): the most that
    divides eval_iters, so that every pass has one shape. A smaller last pass would make torch.compile compile the
    model once more, for dynamic shapes (2.6 s of a 9 s start with a warm cache, baby GPT on CPU).
    """
    return max(n for n in range(1, max(most, 1) + 1) if eval_iters % n == 0)


class EvalWindows:
    """
    eval_tokens > 0: a split's first tokens (`tokens`), every one but the first predicted once, in consecutive windows
    of block_size dealt out to the ranks in turn. The same at every evaluation, and exact where eval_tokens holds the
    whole split. Each pass is `rows` windows, padded with rows of targets -1 past the last window: one shape for every
    pass of every split and rank, so torch.compile compiles the evaluation once, and every rank runs as many passes.
    """

    def __init__(self, tokens, plan, block_size, launch, rows, to_device):
        self.tokens, self.block_size, self.rows, self.to_device = tokens, block_size, rows, to_device
        self.passes = -(-per_rank(plan, launch) // rows)
        self.plan = plan[launch.rank::launch.world_size]

    def __iter__(self):
        for i in range(self.passes):
            chunk = self.plan[i * self.rows:(i + 1) * self.rows]
            yield self.to_device(*window_batch(self.tokens, chunk, self.rows, self.block_size))


def per_rank(plan, launch):
    """The most windows of a plan any rank scores (see EvalWindows)."""
    return -(-len(plan) // launch.world_size)


def evaluation_sets(shards, cfg, launch, to_device):
    """{split: the batches every evaluation scores} for {split: its shards}, and a line that says what they are."""
    most = cfg.eval_batch_size // cfg.batch_size if cfg.eval_batch_size else 1
    if not cfg.eval_tokens:
        per_pass = batches_per_pass(cfg.eval_iters, most)
        sets = {split: EvalBatches(s, cfg, launch, per_pass, to_device) for split, s in shards.items()}
        passes = cfg.eval_iters // per_pass
        return sets, (
            f"evaluation: {cfg.eval_iters} batches per split, in {passes} pass{'es' if passes > 1 else ''} of "
            f"{per_pass * cfg.batch_size} sequences" +
            (f" (eval_batch_size allows {most} batches a pass, but only {per_pass} divides eval_iters={cfg.eval_iters};"
             f" an eval_iters that {most} divides takes fewer passes)" if per_pass < most and passes > 1 else ""))
    tokens = {split: first_tokens(s, cfg.eval_tokens) for split, s in shards.items()}
    for split, t in tokens.items():
        if len(t) < 2:
            raise UserError(f"the {split} split has {len(t)} token(s): nothing to evaluate")
    plans = {split: windows(len(t), cfg.block_size, cfg.block_size) for split, t in tokens.items()}
    # rows: as few passes as eval_batch_size allows for the largest split, as evenly filled as they can be
    largest = max(per_rank(plan, launch) for plan in plans.values())
    passes = -(-largest // (most * cfg.batch_size))
    rows = -(-largest // passes)
    sets = {split: EvalWindows(tokens[split], plans[split], cfg.block_size, launch, rows, to_device)
            for split in tokens}
    described = ", ".join(f"{split} {len(t):,} tokens{' (all of it)' if len(t) < cfg.eval_tokens else ''} in "
                          f"{sets[split].passes} pass{'es' if sets[split].passes > 1 else ''}"
                          for split, t in tokens.items())
    return sets, (f"evaluation: each split's first {cfg.eval_tokens:,} tokens, every one but the first predicted "
                  f"once, in passes "
                  f"of {rows} window{'s' if rows > 1 else ''} of {cfg.block_size} tokens"
                  f"{' per process' if launch.distributed else ''}: "
                  f"{described}")


def draw_sample(model, prompt, ids, max_new_tokens, tokenizer, autocast, seed):
    """
    The text of one sample of `model` (the plain one: neither compiled nor wrapped in DDP) continuing `prompt`
    (`ids`, its tokens), drawn as sample.py draws by default and ended at end-of-text. Its random numbers come from
    a generator of its own, so sampling leaves the training's (dropout, the exact resume) untouched.
    """
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    stop = Stop([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    model.eval()
    try:
        with autocast:
            new, = generate(model, [ids], max_new_tokens, TEMPERATURE, TOP_K, stop=stop, generator=generator)
    finally:
        model.train()
    return prompt + tokenizer.decode(new)


def rng_state(device):
    """This process's random states: CUDA's of its own GPU only, since a resume may see fewer GPUs or number them
    differently (another machine, CUDA_VISIBLE_DEVICES, 2 nodes of 4 instead of 1 of 8)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not device.startswith("cuda"):
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state, this process's at its index
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


class StopFlag:
    """
    SIGTERM (what Slurm and torchrun send before killing), SIGUSR1 (Slurm's --signal=USR1@120), Ctrl-C's SIGINT and
    SIGHUP (the terminal closed: an ssh connection lost) only set a flag: the training loop notices it at the next
    step boundary, on every rank at once, then saves and exits. A second Ctrl-C raises KeyboardInterrupt at once, for
    a user who will not wait for the save. (Under torchrun the workers run in a session of their own: Ctrl-C reaches
    them once, forwarded by torchrun.) A SIGHUP that nohup set to be ignored stays ignored.
    A context manager: the handlers it replaced are back when it exits.
    """

    def __init__(self, say_now=None):
        self.signal, self.say_now = None, say_now
        self._replaced, self._leaving, self._interrupts = {}, False, 0

    def __enter__(self):
        for name in ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP"):
            if hasattr(signal, name):
                sig = getattr(signal, name)
                if name == "SIGHUP" and signal.getsignal(sig) == signal.SIG_IGN:  # nohup: the run outlives the terminal
                    continue
                self._replaced[sig] = signal.signal(sig, self._handle)
        return self

    def leaving(self):
        """
        The ranks have agreed to stop and rank 0 has saved: from here until the process ends, SIGTERM and SIGUSR1 are
        ignored. `srun --kill-on-bad-exit` (slurm/train.sbatch) sends SIGTERM to the ranks still running once the
        first has exited with code 3; by default that would kill them, and srun would then return 143, not the 3
        the script requeues on.
        """
        self._leaving = True

    def __exit__(self, *exc):
        for sig, handler in self._replaced.items():
            leaving = self._leaving and sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None))
            signal.signal(sig, signal.SIG_IGN if leaving else handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        self._interrupts += name == "SIGINT"
        if self._interrupts > 1:  # counted apart: a Ctrl-C after a SIGTERM is the first one (it once never stopped)
            raise KeyboardInterrupt
        self.signal = self.signal or name
        if name == "SIGHUP":  # writes to the terminal fail now (EIO); log.jsonl gets its records still
            hung_up_to_devnull()
        if name == "SIGINT" and self.say_now:
            self.say_now("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop now, "
                         "without saving)\n")


def hung_up_to_devnull():
    """Standard output and error to nowhere where they were a terminal (a character device: after the hang-up a pty
    is no longer a tty to isatty); redirected to a file or a pipe, they still get every line."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stat.S_ISCHR(os.fstat(stream.fileno()).st_mode):
                configurator.silence(stream)
        except (OSError, ValueError, io.UnsupportedOperation):  # closed, or a stream with no file (a test's capture)
            pass


def reduce_mean(value, launch):
    """The mean of a scalar tensor over all ranks (the value itself in a single process)."""
    if launch.distributed:
        value = all_reduce_sum(value.clone(), launch) / launch.world_size
    return value


GO_ON, STOP, WRITE_FAILED = 0, 1, 2  # what the ranks agree on before each step: the most serious any rank says
# why a run stops, agreed too (a signal may reach one rank only): the later wins, Ctrl-C (exit 130, not requeued) first
STOP_REASONS = (None, "max_runtime", "SIGUSR1", "SIGHUP", "SIGTERM", "SIGINT")


def agree(status, launch, device):
    """The largest `status` of all ranks, on every rank."""
    return agree_each([status], launch, device)[0]


def agree_each(values, launch, device):
    """The largest of each of `values` (small ints) over all ranks, on every rank."""
    if not launch.distributed:
        return list(values)
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def gather_to_master(obj, launch):
    """A list of every rank's `obj` on rank 0 (None elsewhere); [obj] in a single process."""
    if not launch.distributed:
        return [obj]
    import torch.distributed as dist
    out = [None] * launch.world_size if launch.is_master else None
    dist.gather_object(obj, out, dst=0)
    return out


def to_device(x, y, device):
    """numpy (x, y) batch -> tensors on `device`; on CUDA through pinned memory, so the copy overlaps with compute
    (contiguous first: x and y are strided views of one array, and a strided copy goes through pageable memory)."""
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if device.startswith("cuda"):
        return (x.contiguous().pin_memory().to(device, non_blocking=True),
                y.contiguous().pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


class Prefetcher:
    """
    Training batches one ahead: `batch` is the batch to compute on; advance() reads the following one and sends it to
    the device, which overlaps with the compute already queued. The state to checkpoint is the sampler's state before
    the batch in hand, so a resumed run starts with exactly that batch.
    """

    def __init__(self, sampler, to_device):
        self.sampler, self.to_device = sampler, to_device
        self.advance()

    def advance(self):
        self._state = self.sampler.state_dict()
        self.batch = self.to_device(*self.sampler.next_batch())

    def state_dict(self):
        return self._state


def accumulate_gradients(model, batches, grad_accum, autocast, scaler, optimizer, grad_clip, distributed,
                         spike=None):
    """
    One optimizer step over grad_accum micro-batches drawn from `batches`. Returns (the micro-steps' mean loss, global
    gradient norm, why the step was skipped or None): a step whose gradient norm is not finite is not applied, nor one
    that spike(losses, norm) calls a spike.
    """
    loss_sum = 0.0
    for micro in range(grad_accum):
        # DDP all-reduces gradients only on the last micro-step; no_sync must cover forward and backward
        sync = model.no_sync() if distributed and micro < grad_accum - 1 else nullcontext()
        with sync:
            with autocast:
                _, loss = model(*batches.batch)
                loss = loss / grad_accum  # gradients of the mean over micro-steps
            batches.advance()  # read the next batch while the device runs the forward pass
            scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()  # a new tensor: a CUDA graph may reuse `loss` on the next call
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if not torch.isfinite(grad_norm):
        return loss_sum, grad_norm, "non-finite"
    skip = spike(loss_sum, grad_norm) if spike else None
    if skip:
        return loss_sum, grad_norm, skip
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, None


class SpikeGuard:
    """
    Skips outlier updates, as llm.c's -sl and -sg do: a step whose loss or gradient norm lies more than `threshold`
    standard deviations above the mean of the last `window` steps' is not applied. A skipped step's values join the
    window too, so a lasting change of level (other data after a resume) soon becomes the norm instead of being
    refused for ever. Its state (the windows) goes into the checkpoint: a resumed run skips what the uninterrupted one
    would.
    """

    def __init__(self, threshold, window):
        self.threshold, self.window = threshold, window
        self.history = {"loss": [], "grad_norm": []}

    def check(self, values):
        """The spikes among values ({'loss': x, 'grad_norm': y}), described, after adding the values to the windows."""
        spikes = []
        for name, x in values.items():
            past = self.history[name]
            if len(past) == self.window:
                mean = statistics.fmean(past)
                sd = statistics.pstdev(past, mean)
                if sd > 0 and (x - mean) / sd > self.threshold:
                    spikes.append(f"{name} {x:.4g}, {(x - mean) / sd:.1f} standard deviations above the mean of the "
                                  f"last {self.window} steps' ({mean:.4g})")
            past.append(x)
            del past[:-self.window]
        return "; ".join(spikes)

    def state_dict(self):
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state):
        self.history = {name: list(state.get(name, []))[-self.window:] for name in self.history}


def forget_gathered_state(optimizer):
    """
    ZeroRedundancyOptimizer keeps what consolidate_state_dict gathered on rank 0 (every rank's share: the whole
    optimizer state, in CPU memory, 12.5 GB for GPT-2 1558M with AdamW) until the next consolidation. Once the
    checkpoint's state dict holds it, that copy is only memory taken from rank 0 between saves: let it go.
    """
    for each in getattr(optimizer, "optimizers", {"": optimizer}).values():  # Muon's pair: each one's
        if hasattr(each, "_all_state_dicts"):  # ZeRO's list (private; a later torch without it keeps its copy)
            each._all_state_dicts = []


def weights_shape(model_args):
    """The SHAPE_KEYS of a model as its checkpoint's model_args give them (an option a checkpoint does not name, as
    nanoGPT's and those from before it, has GPT-2's value)."""
    return {k: model_args.get(k, GPT2_OPTIONS.get(k, GPTConfig.__dataclass_fields__[k].default)) for k in SHAPE_KEYS}


def config_files_of(sources):
    """The names of the config files a run's settings came from (sources: where each value came from); a file whose
    every setting the command line overrode is not among them."""
    return sorted({os.path.basename(v) for v in sources.values() if v.endswith(".py")})


def shape_from_weights(cfg, sources, model_args, name, say, resume=False, read_before=None):
    """
    A run on given weights (a new run from a checkpoint or GPT-2, eval_only, or a resume) has their model: the
    SHAPE_KEYS come from model_args, so that the config this run saves says what it trains, and block_size too unless
    it is set (a smaller one crops the context; a longer one takes rope: fit_context). A shape key set on the command
    line to another value is refused, as a request for another model; one a config file sets (a recipe's
    from-scratch shape) gives way, with a note, block_size where the weights cannot take it. A resume goes on with
    the checkpoint's model, block_size included, whatever the config files its run read say (read_before: their
    names; None for checkpoints from before they were recorded), but refuses another shape from a config file that
    run never read: another experiment's, a sweep's next point in the same out_dir. The command line's keys are left
    to check_resume, which refuses those that differ.
    """
    shape = weights_shape(model_args)
    if resume:
        fixed = [k for k in SHAPE_KEYS if sources.get(k) != "command line"]
    else:
        # block_size may differ where set: shorter crops the context, longer takes rope (fit_context), but a config
        # file's longer one for a learned position table gives way like its other shape keys
        longer = sources.get("block_size", "command line") != "command line" and \
            cfg.block_size > shape["block_size"] and not shape["rope"]
        fixed = [k for k in SHAPE_KEYS if k != "block_size" or k not in sources or longer]
    differ = [k for k in fixed if k in sources and getattr(cfg, k) != shape[k]]
    asked = [f"--{k}={getattr(cfg, k)} ({name} has {shape[k]})" for k in differ if sources[k] == "command line"]
    strangers = [f"{k}={getattr(cfg, k)!r} ({sources[k]})" for k in differ if read_before is not None
                 and sources[k].endswith(".py") and os.path.basename(sources[k]) not in read_before]
    if strangers:
        raise UserError(f"cannot resume {name} with {', '.join(strangers)}: its run trained "
                        f"{', '.join(f'{k}={shape[k]!r}' for k in differ)}, and none of its settings came from that "
                        f"config file ({'they came from ' + ', '.join(read_before) if read_before else 'nor from any'}"
                        "); another experiment belongs in another --out_dir (to resume this run, give its shape on "
                        "the command line)")
    if asked:
        raise UserError(f"{name}'s weights fix the model's shape: {', '.join(asked)}; leave "
                        f"{'these settings' if len(asked) > 1 else 'it'} out, or train a model of that shape from "
                        "scratch")
    if differ:
        say(f"note: the model's shape comes from {name}: " +
            ", ".join(f"{k}={shape[k]!r}, not {getattr(cfg, k)!r} ({sources[k]})" for k in differ))
    return (dataclasses.replace(cfg, **{k: shape[k] for k in fixed}),
            {**sources, **{k: f"the weights of {name}" for k in fixed}})


def milestone_rules(checkpoint, step, keep_every):
    """
    The run's keep_every rules at a resume from `step` with this keep_every: (interval, the last step it covers, None
    for this run's). An interval the run no longer has covers the steps up to the resume, so the checkpoints it kept
    stay; later ones follow the run's setting. Checkpoints from before the ends were recorded give intervals alone.
    """
    old = checkpoint.get("keep_every", [(checkpoint.get("config") or {}).get("keep_every", 0)])
    rules = [tuple(r) if isinstance(r, (list, tuple)) else (r, None) for r in old]
    rules = [(every, step if until is None and every != keep_every else until) for every, until in rules if every]
    if keep_every and (keep_every, None) not in rules:
        rules.append((keep_every, None))
    return rules


def check_resume(checkpoint, cfg, data_meta, say, sources=None):
    """Refuse to resume into a different model or dataset; report the settings that changed, a derived one with the
    key it follows (sources: where each value came from; a key's name for one derived from that key)."""
    old = checkpoint.get("config") or {}
    # the model's own record: a run from --init_from once saved the command line's default shape in its config
    shape = weights_shape(checkpoint.get("model_args") or {})
    problems = [f"{k}: checkpoint {shape[k]!r}, now {getattr(cfg, k)!r}"
                for k in SHAPE_KEYS if shape[k] != getattr(cfg, k)]
    # another dataset folder is allowed (data moved, or training continued on other text), as a changed setting
    # below; another tokenizer is not: the model's ids would mean other things
    old_meta = checkpoint.get("meta") or {}
    if old_meta.get("tokenizer") not in (None, data_meta.get("tokenizer")):
        raise UserError("cannot resume: " + mismatch(cfg.out_dir, old_meta, dataset_dir(cfg.dataset, cfg.data_root),
                                                     data_meta))
    if old.get("optimizer", "adamw") != cfg.optimizer:  # one optimizer's state means nothing to the other
        raise UserError(f"cannot resume: the checkpoint was trained with optimizer={old.get('optimizer', 'adamw')!r}"
                        f", this run asks for {cfg.optimizer!r}; resume with the checkpoint's optimizer, or start a "
                        f"new run from its weights: --init_from={cfg.out_dir} --out_dir=<another folder>")
    if problems:
        raise UserError("cannot resume: the checkpoint was trained with a different model or tokenizer (" +
                        "; ".join(problems) + "); resume with the checkpoint's settings, or start a new run in "
                        "another --out_dir")
    follows = {k: f" (follows {v})" for k, v in (sources or {}).items() if hasattr(cfg, v)}
    changed = [f"{k} {old[k]!r} -> {getattr(cfg, k)!r}{follows.get(k, '')}" for k in old
               if hasattr(cfg, k) and k not in ("init_from", "eval_only", *SHAPE_KEYS) and old[k] != getattr(cfg, k)]
    if changed:
        say("resuming with changed settings: " + ", ".join(changed))


def evaluation_changes(checkpoint, cfg, world_size, val_data):
    """What makes this run's val loss an estimate over other tokens than the checkpoint's best val loss was, as
    'key old -> new'. With eval_tokens the windows depend on the data and block_size only; with eval_iters on the
    batches each rank draws too. val_data: the val split's fingerprint now (Dataset.fingerprint), which tells a
    dataset prepared anew under its old name, and the same tokens under another name (a copy: no change)."""
    old = checkpoint.get("config") or {}
    digests = val_data and all(isinstance(d, str) for d in val_data)  # not nanoGPT's files' sizes: they may agree
    same_tokens = digests and checkpoint.get("val_data") == val_data
    keys = ("block_size", "eval_tokens") + (() if same_tokens else ("dataset",)) + \
        (() if cfg.eval_tokens else ("batch_size", "eval_iters", "seed"))
    changes = [f"{k} {old[k]!r} -> {getattr(cfg, k)!r}" for k in keys if k in old and old[k] != getattr(cfg, k)]
    if not changes and checkpoint.get("val_data") not in (None, val_data):
        changes.append(f"the val split of {cfg.dataset} was prepared anew")
    ranks = len(checkpoint.get("rng") or [])
    if not cfg.eval_tokens and ranks and ranks != world_size:
        changes.append(f"processes {ranks} -> {world_size}")
    return changes


def set_aside_later(out_dir, step, log_path):
    """
    A resume from `step` where the run had gone further (ckpt.pt linked back to an earlier checkpoint, the README's
    way back): the later numbered checkpoints, best.pt where it is one of them, and the log's records past `step` are
    another branch. Left in place, keep_last_n would keep them over the new branch's own checkpoints, and a fallback
    hint would name them; they move, whole, to out_dir/after_<step>/. Returns a note saying so, or None.
    """
    later = [path for s, path in step_checkpoints(out_dir) if s > step]
    if not later:
        return None
    folder = free_name(os.path.join(out_dir, f"after_{step:08d}"))  # an earlier return's branch stays whole
    os.makedirs(folder)
    best = os.path.join(out_dir, BEST)
    moved = later + [best] if os.path.isfile(best) and (saved_step(best) or -1) > step else later  # a copy, too
    for path in moved:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    if os.path.exists(log_path):
        with open(os.path.join(folder, "log.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(log_records_split(log_path, step)[1])
    names = [os.path.basename(p) for p in moved]
    return (f"note: the run had gone past step {step} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): "
            f"that branch is moved to {folder}, with its log, so this one's checkpoints are kept in its place "
            "(delete the folder to let it go)")


def log_records_split(path, step):
    """The complete lines of log.jsonl up to `step` and past it."""
    with open(path, encoding="utf-8") as f:
        # a last line without its newline is the end of a run killed while writing it (or a full disk)
        lines = [line for line in f if line.endswith("\n") and line.strip()]
    past = [json.loads(line).get("step", 0) > step for line in lines]
    return [line for line, p in zip(lines, past) if not p], [line for line, p in zip(lines, past) if p]


def started_only(path):
    """Whether a log.jsonl holds no records but start records: of a run stopped before its first step."""
    return all("start" in json.loads(line) for line in log_records_split(path, math.inf)[0])


def trim_log(path, step):
    """Drop log records past `step` (written after the checkpoint being resumed), so no step appears twice."""
    if not os.path.exists(path):
        return
    kept = log_records_split(path, step)[0]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def plot_losses(log_path, png_path):
    """
    Train and val loss against tokens seen, from log.jsonl, to png_path (atomically). It may run on the writer thread
    while the training loop appends to the log: a last line not yet complete is left for the next plot, and the
    figure is drawn without pyplot, whose global state is not thread-safe.
    """
    from matplotlib.figure import Figure

    train, val = [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            r = json.loads(line)
            if "loss" in r and not r.get("skipped"):  # a skipped spike's loss trained nothing
                train.append((r["tokens"], r["loss"]))
            if "val_loss" in r:
                val.append((r["tokens"], r["val_loss"]))
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train (per step)", alpha=0.6, linewidth=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val", markersize=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = png_path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):  # a failed write (a full disk) leaves no half-written file behind
            os.remove(tmp)


PRINT_LOCK = threading.Lock()


def locked_print(*args, **kwargs):
    """print, but whole: the writer thread's messages never land between a line of the loop's and its newline. A
    reader of the output that goes away (`| head`), or a terminal that does (a lost ssh connection, where SIGHUP is
    ignored or not yet handled), stops the printing, not the run: log.jsonl has every record."""
    with PRINT_LOCK:
        try:
            print(*args, **kwargs)
        except BrokenPipeError:
            configurator.silence(sys.stdout)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            hung_up_to_devnull()


def start_wandb(cfg, run_id):
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True but wandb is not installed: pip install wandb") from None
    # the same run id after a resume continues the same wandb run
    try:
        name = cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.out_dir))
        return wandb.init(project=cfg.wandb_project, name=name, config=dataclasses.asdict(cfg), id=run_id,
                          resume="allow")
    except Exception as e:  # no API key, no network, a bad project name: wandb's own words, in one line
        raise UserError(f"wandb could not start a run ({type(e).__name__}: {str(e).strip().splitlines()[0]}); run "
                        "`wandb login`, or set WANDB_MODE=offline to log locally, or drop --wandb_log") from None


def load_hellaswag_share(cfg, tokenizer, launch, device, say):
    """This rank's share of the HellaSwag items, tokenized, once at start-up. The first process of each node downloads
    the file (one per node, whether data_root is shared or not); a failure anywhere stops every rank, as one."""
    path = hellaswag.default_path(cfg.data_root)
    error, mine = None, None
    try:
        if launch.local_rank == 0:
            hellaswag.fetch(path, f"offline, put a copy of hellaswag_val.jsonl at {path}, or drop --hellaswag")
    except UserError as e:
        error = e
    if not agree(int(error is not None), launch, device):
        try:
            items, note = hellaswag.first_items(path, cfg.hellaswag_items)
            mine, cropped = hellaswag.share(items, tokenizer, path, launch, cfg.block_size)
            for line in (note, cropped):
                if line:
                    say(line)
            say(f"hellaswag: {hellaswag.count(len(items))} of {path}, scored at each evaluation")
        except UserError as e:
            error = e
    if agree(int(error is not None), launch, device):
        if error is not None:
            raise UserError(f"--hellaswag: {error}")
        raise SystemExit(2)  # another rank says why
    return mine


def main(cfg, sources):
    launch = detect_launch()
    device = init_distributed(launch, pick_device(cfg.device), cfg.backend)
    try:
        kernels, kernels_note = fast_kernels(device, cfg.attention)
        # os.write, not print: a handler that prints while the loop is inside print raises "reentrant call"
        say_now = (lambda text: os.write(2, text.encode())) if launch.is_master else None
        with kernels, StopFlag(say_now) as stop, \
                FolderLock(cfg.out_dir, "train.lock", enabled=launch.is_master and not cfg.eval_only) as lock:
            return train(cfg, sources, launch, device, stop, kernels_note, lock)
    except BaseException as e:
        # the traceback would keep train's frame, and with it the DDP model, alive until the interpreter shuts down,
        # past cleanup, which must come after it (see cleanup_distributed)
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        cleanup_distributed()


def train(cfg, sources, launch, device, stop, kernels_note, lock):
    t_start = time.time()
    say = locked_print if launch.is_master else (lambda *a, **k: None)
    max_runtime = parse_duration(cfg.max_runtime)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    data = Dataset(dataset_dir(cfg.dataset, cfg.data_root))
    train_shards, val_shards = data.shards("train"), data.shards("val")
    val_data = data.fingerprint("val")  # recorded in checkpoints: a resume tells other val tokens by it
    train_data = data.fingerprint("train")  # and other train tokens under the same name
    config_files = config_files_of(sources)  # recorded too: a resume tells another experiment's config file by it
    meta = {k: data.meta.get(k) for k in ("tokenizer", "vocab_size", "eot_id")}
    try:  # for HellaSwag, the samples and bits per byte; a GPT-2 BPE that cannot load (offline) costs only the last two
        tokenizer, why_not = tokenizer_from_meta(data.meta), None
    except UserError as e:
        if cfg.hellaswag:
            raise
        tokenizer, why_not = None, str(e)
    # alike on every rank (bits per byte are summed over them): tiktoken's cache may be on one node and not another
    if agree(int(tokenizer is None), launch, device) and tokenizer is not None:
        tokenizer, why_not = None, "another process could not load it"
    sample_from = None  # the prompt of the samples at evaluations, checked before any work
    if cfg.sample_tokens and not cfg.eval_only and tokenizer is not None:
        text = read_prompt(cfg.sample_start, "--sample_start")
        sample_from = (text, prompt_ids(tokenizer, text, "--sample_start"))

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if agree(int(lock.holder is not None), launch, device):  # every rank stops, rank 0 says why
        if lock.holder is not None:
            raise UserError(f"another train.py is running in {cfg.out_dir} ({lock.holder}, says {lock.path}): wait "
                            "for it to end, or give this run another --out_dir")
        raise SystemExit(2)
    if lock.file is not None:  # held: no other train.py writes here, what a killed one was
        # writing is left over
        leftovers = unfinished_files(cfg.out_dir)
        if leftovers:
            size = sum(os.path.getsize(p) for p in leftovers)
            for path in leftovers:
                os.remove(path)
            say(f"removed {len(leftovers)} unfinished checkpoint file(s) a killed run left in {cfg.out_dir} "
                f"({size / 2**20:,.1f} MiB): {', '.join(os.path.basename(p) for p in leftovers)}")
    resume = cfg.init_from == "resume" or (cfg.init_from == "auto" and os.path.exists(ckpt_path))
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    resumable = os.environ.get(RESUME_VARIABLE) == "1"  # slurm/train.sbatch's jobs, submitted again or requeued
    # an evaluation under the script evaluates the run too, unless it names other weights
    if (restarts or resumable) and not resume and os.path.exists(ckpt_path) and \
            (not cfg.eval_only or cfg.init_from == "scratch"):
        # a requeued or resubmitted Slurm job goes on with its own run, whatever it began from: a fine-tune's
        # --init_from (from the command line or a config file) would be refused here, and the job only repeats it
        why = f"requeued job (restart {restarts})" if restarts else f"{RESUME_VARIABLE}=1 (slurm/train.sbatch)"
        say(f"{why}: resuming from {ckpt_path}, not --init_from={cfg.init_from} (to start over, give the job another "
            "--out_dir)")
        cfg, sources, resume = dataclasses.replace(cfg, init_from="resume"), {**sources, "init_from": why}, True
    if cfg.init_from == "auto" and not resume and not cfg.eval_only:  # from another folder, a relative out_dir is
        # another run's: said, with where it looked (a trial's resume started anew without a word)
        say(f"init_from=auto: no checkpoint at {os.path.abspath(ckpt_path)}: a new run starts from scratch")
    if not resume and not cfg.eval_only:
        refuse_to_overwrite(cfg.out_dir, ckpt_path)
    if cfg.eval_only and not resume and not pretrained_name(cfg) and os.path.isfile(ckpt_path):
        say(f"note: eval_only evaluates freshly initialised weights (init_from={cfg.init_from}); "
            f"--init_from=auto evaluates {ckpt_path}")
    checkpoint = load_checkpoint(ckpt_path) if resume else None
    if checkpoint is not None and "step" not in checkpoint:
        raise UserError(f"{ckpt_path} holds no training state to resume (a nanoGPT checkpoint?): sample from it, "
                        f"evaluate it, or train on from its weights in another --out_dir with --init_from={ckpt_path}")
    if checkpoint is not None and lock.file is not None and best_linked(cfg.out_dir, checkpoint):
        say(f"note: {os.path.join(cfg.out_dir, BEST)} is now {ckpt_path}'s step {checkpoint['step']}, the best, "
            "which a killed save had not linked yet")
    pretrained = pretrained_name(cfg)
    start_from = None  # a checkpoint of this toolkit whose weights, and nothing else, this run starts from
    if pretrained and is_checkpoint(pretrained):
        start_from = load_checkpoint(pretrained)
        trained_on = checkpoint_meta(start_from, pretrained)
        if (trained_on["tokenizer"], trained_on["vocab_size"]) != (data.meta["tokenizer"], data.meta["vocab_size"]):
            raise UserError(mismatch(pretrained, trained_on, data.data_dir, data.meta))
        cfg, sources = shape_from_weights(cfg, sources, start_from["model_args"], pretrained, say)
    elif pretrained:
        check_dataset_tokenizer(pretrained, data.data_dir, data.meta)  # before downloading the weights
        cfg, sources = shape_from_weights(cfg, sources, dataclasses.asdict(pretrained_config(pretrained)), pretrained,
                                          say)
    elif checkpoint is not None and cfg.eval_only:  # it evaluates the checkpoint, whatever shape and optimizer
        cfg, sources = shape_from_weights(cfg, sources, checkpoint["model_args"], ckpt_path, say)
        cfg = dataclasses.replace(cfg, optimizer=(checkpoint.get("config") or {}).get("optimizer", "adamw"))
    elif checkpoint is not None:  # a resume: a shape key left out, or a config file's, is the checkpoint's
        cfg, sources = shape_from_weights(cfg, sources, checkpoint.get("model_args") or {}, ckpt_path, say,
                                          resume=True, read_before=checkpoint.get("config_files"))
        config_files = sorted(set(config_files) | set(checkpoint.get("config_files", [])))
    grad_accum, batch_explain = micro_steps_per_rank(cfg, launch.world_size)
    given = sources.get("gradient_accumulation_steps")
    if cfg.total_batch_size and given and cfg.gradient_accumulation_steps != grad_accum * launch.world_size:
        unused = (f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} ({given}) is not used: "
                  f"total_batch_size={cfg.total_batch_size:,} makes it {grad_accum * launch.world_size}")
        if given == "command line":  # asked for now, and it would be ignored
            raise UserError(f"{unused}; give --total_batch_size=0 with it, or leave it out")
        say(f"note: {unused}")
    tokens_per_step = cfg.batch_size * cfg.block_size * grad_accum * launch.world_size
    steps_done = (checkpoint or {}).get("step", 0)  # a resume's steps so far, at the tokens per step they had
    tokens_done = (checkpoint or {}).get("tokens_seen", steps_done * tokens_per_step)

    def count_params():
        with torch.device("meta"):  # the count for this shape, without allocating it
            return GPT(model_config(cfg, data.meta["vocab_size"])).get_num_params()
    cfg, sources, length_from = run_length(cfg, sources, tokens_per_step, steps_done, tokens_done, count_params, say)

    say(f"launch: {launch.mode}, {launch.world_size} process(es); device {device}, {dtype}; {kernels_note}")
    if tokenizer is None:
        say(f"note: without the dataset's tokenizer ({why_not}) no bits per byte are reported" +
            (" and no samples drawn" if cfg.sample_tokens else ""))
    say("config:\n" + configurator.describe(cfg, sources))
    say(f"batch: {batch_explain}")
    train_tokens = sum(s.num_tokens for s in train_shards)
    run_tokens = tokens_done + max(cfg.max_iters - steps_done, 0) * tokens_per_step
    if not cfg.eval_only:  # an evaluation has no length
        say(f"length: {cfg.max_iters:,} steps = {run_tokens:,} tokens{f' ({length_from})' if length_from else ''}, "
            f"{run_tokens / train_tokens:.2f} epochs of the train split ({train_tokens:,} tokens; "
            f"data_order={cfg.data_order}: " + DATA_ORDERS[cfg.data_order] + ")")
    if checkpoint is not None:
        check_resume(checkpoint, cfg, data.meta, say, sources)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if checkpoint is not None:
        model = model_from_checkpoint(checkpoint, ckpt_path, dropout=cfg.dropout)
    elif start_from is not None:
        model = model_from_checkpoint(start_from, pretrained, dropout=cfg.dropout)
        trained_at = model.config.block_size
        fit_context(model, cfg.block_size, pretrained)
        if cfg.block_size > trained_at:  # a rope model's
            say(f"note: block_size={cfg.block_size} is longer than the {trained_at} tokens {pretrained} was trained "
                "on: RoPE's angles reach the new positions, but using them well takes training at this length")
        at = step_of(start_from)
        say(f"initialised from the weights of {pretrained}{f' (its step {at})' if at is not None else ''}; the "
            "optimizer, the step count and the schedule start anew")
        start_from = None  # free the memory
    elif pretrained:
        model = load_hf_gpt2(pretrained, dropout=cfg.dropout, block_size=cfg.block_size)
        say(f"initialised from {pretrained}")
    else:
        model = GPT(model_config(cfg, data.meta["vocab_size"]))
    model_args = dataclasses.asdict(model.config)
    model.fused_loss, model.recompute = cfg.fused_loss, cfg.recompute
    model.to(device)
    options = "".join(f", {k}={v!r}" for k, v in model.config.departures().items())
    say(f"model: {model.get_num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size} "
        f"(padded to {model.config.padded_vocab_size}){f'; GPT-2 but for {options[2:]}' if options else ''}")

    sharded = cfg.shard_optimizer and launch.distributed
    if sharded:  # each rank steps its share of the parameters and broadcasts them (a collective, once a step)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        def make(optimizer_class, groups, **settings):
            return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **settings)
    else:
        make = None
        if cfg.shard_optimizer:
            say("note: shard_optimizer has nothing to share out in one process; each keeps its whole state here")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), make,
                                           muon=cfg.optimizer == "muon")
    say(f"optimizer: {OPTIMIZER_NAMES[cfg.optimizer]}" +
        (f", its state sharded over the {launch.world_size} processes (ZeRO-1)" if sharded else ""))
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))

    step, best_val_loss, wandb_id, tokens_seen = 0, float("inf"), None, 0
    # (interval, last step it covers; None: this run's) for every keep_every the run has had: their milestones stay
    keep_every = [(cfg.keep_every, None)] if cfg.keep_every else []
    saves = [n for n in (cfg.eval_interval, cfg.save_interval) if n]  # the steps a checkpoint can be written at
    if cfg.keep_every and not cfg.eval_only and not any(cfg.keep_every % n == 0 for n in saves):
        first = min(math.lcm(cfg.keep_every, n) for n in saves)
        keys = "eval_interval" + (", save_interval" if cfg.save_interval else "")
        say(f"note: keep_every={cfg.keep_every} keeps the saves that fall on its multiples, and saves come every "
            f"{' or '.join(f'{n:,}' for n in saves)} steps ({keys}): the first kept is at step {first:,}; "
            f"--save_interval={cfg.keep_every} keeps each multiple")
    spikes = SpikeGuard(cfg.skip_spikes, cfg.spike_window)
    sampler = SAMPLERS[cfg.data_order](train_shards, cfg.block_size, cfg.batch_size, seed=[cfg.seed, 0],
                                       rank=launch.rank, world_size=launch.world_size)
    torch.manual_seed(cfg.seed + launch.rank)  # dropout masks differ between ranks
    if checkpoint is not None:
        this_run = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, settings in zip(optimizer.param_groups, this_run):
            group.update(settings)  # moments and step counts from the checkpoint; weight_decay and betas as set now
        if checkpoint.get("scaler"):  # empty unless the checkpoint's run was float16 (its scaler was off)
            scaler.load_state_dict(checkpoint["scaler"])
        step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
        # counted, not step x tokens per step: the batch may have changed on an earlier resume (checkpoints from
        # before the count: what was logged then)
        tokens_seen = tokens_done
        wandb_id = checkpoint.get("wandb_run_id")
        spikes.load_state_dict(checkpoint.get("spikes") or {})
        keep_every = milestone_rules(checkpoint, step, cfg.keep_every)
        dropped = [(every, until) for every, until in keep_every if until is not None]  # intervals the run dropped
        milestones = [os.path.basename(p) for s, p in step_checkpoints(cfg.out_dir) if kept_for_good(s, dropped)]
        if milestones and any(until == step for every, until in dropped):  # an interval this resume drops
            say(f"note: the checkpoints kept for good so far ({', '.join(milestones[:4])}"
                f"{', ...' if len(milestones) > 4 else ''}) stay kept; delete them by hand to let them go")
        if ("epoch" in checkpoint["sampler"]) == (cfg.data_order == "epochs"):
            sampler.load_state_dict(checkpoint["sampler"])  # the same on every rank: they draw one global batch
            windows = checkpoint["sampler"].get("windows")
            if windows is not None and windows != sampler.windows:
                say(f"note: the train split now has {sampler.windows:,} windows, not {windows:,}: epoch "
                    f"{sampler.epoch + 1} goes on at the same fraction of it, in another order")
        else:
            say(f"note: data_order is now {cfg.data_order}: its batches start anew, from the seed")
        ranks = checkpoint.get("rng") or []
        if launch.rank < len(ranks) and len(ranks) == launch.world_size:
            set_rng_state(ranks[launch.rank], device)
        elif cfg.dropout:  # the random state only draws dropout masks (batches have their own generators)
            say(f"note: the checkpoint holds RNG states of {len(ranks)} rank(s), this run has {launch.world_size}; "
                "dropout masks will differ from an uninterrupted run")
        say(f"resumed from {ckpt_path} at step {step} (best val loss {best_val_loss:.4f})")
        before = saved_config(checkpoint)
        if cfg.decay_lr and before.decay_lr and step < cfg.max_iters and not cfg.eval_only and \
                not math.isclose(lr_at(step, before), lr_at(step, cfg), rel_tol=1e-9):
            # a longer run whose schedule follows it, a token count now in steps of another size, a new schedule
            changed = [f"{k} {getattr(before, k)!r} -> {getattr(cfg, k)!r}" for k in SCHEDULE_KEYS
                       if getattr(before, k) != getattr(cfg, k)]
            now, then = told_apart(lr_at(step, cfg), lr_at(step, before))
            # a key no command line gave: a longer run's that follows it, or a default changed by an update of this
            # toolkit (lr_decay_iters 600000 -> max_iters), which the user did not change (a trial): how to keep it
            keep = [f"--{k}={getattr(before, k)}" for k in SCHEDULE_KEYS
                    if getattr(before, k) != getattr(cfg, k) and sources.get(k) != "command line"]
            say(f"note: the schedule changed ({', '.join(changed)}): the learning rate at step {step} is {now}, "
                f"not {then}" + (f"; {' '.join(keep)} keeps the checkpoint's" if keep else ""))
        if checkpoint.get("train_data") not in (None, train_data) and \
                (before.dataset, before.data_root) == (cfg.dataset, cfg.data_root):
            # the same names, other tokens: from another folder (a relative data_root), or prepared anew (a trial's
            # resume trained on them without a word)
            say(f"note: the train split in {os.path.abspath(data.data_dir)} is not the one the run trained on (its "
                "shards' digests differ: another folder by that name, or the dataset prepared anew): training goes on "
                "over other tokens")
        changes = evaluation_changes(checkpoint, cfg, launch.world_size, val_data)
        if changes and best_val_loss < float("inf"):  # not to be compared: a save could wait for a number out of reach
            say(f"note: the val loss is now measured on other tokens ({', '.join(changes)}); the next evaluation "
                f"sets the best anew, {best_val_loss:.4f} was on the old ones")
            best_val_loss = float("inf")
            best_path = os.path.join(cfg.out_dir, BEST)
            if launch.is_master and not cfg.eval_only and os.path.isfile(best_path):  # the old measure's best, aside
                kept = os.path.join(cfg.out_dir, f"best_before_{step:08d}.pt")
                os.replace(best_path, kept)
                say(f"note: {best_path}, the best on the old measure, is kept as {kept}")
        if step >= cfg.max_iters and not cfg.eval_only:
            ended = cfg.decay_lr and cfg.lr_decay_iters <= step and \
                sources.get("lr_decay_iters") not in ("max_iters", "warmup_iters")
            key = sources["max_iters"] if sources.get("max_iters") in ("max_tokens", "tokens_per_param") else \
                "max_iters"
            say(f"nothing to train: the checkpoint is at step {step} and max_iters is {cfg.max_iters}"
                f"{f' (from {length_from})' if length_from else ''}; raise --{key}" +
                (" (and --lr_decay_iters, or the learning rate stays at min_lr)" if ended else "") + " to train on")
            if checkpoint.get("evaluated", True):
                return best_val_loss  # nothing is due either: no compile or evaluation lines after that
        # an evaluation due at the resumed step is not repeated, unless a stop signal cut it short
        last_eval = step if checkpoint.get("evaluated", True) else None
        checkpoint = None  # free the memory
    else:
        last_eval = None
    saved_step = step  # the step of the newest checkpoint of this run's weights (0: none, nothing trained yet)

    use_compile = cfg.compile if cfg.compile is not None else device_type == "cuda"
    say(f"compile: {f'on, mode {cfg.compile_mode}' if use_compile else 'off'}"
        f"{'' if cfg.compile is not None else ' (default: on for CUDA only)'}")
    raw_model = model
    if use_compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    if launch.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[launch.local_rank] if device_type == "cuda" else None)
        # the model's only buffers are rope's angles, computed alike on every rank, which DDP would otherwise send
        # from rank 0 before every forward pass; set after construction, the one spelling torch 2.4 to 2.13 all take
        # without a warning (2.13 deprecates the argument for forward_sync_buffers, which older ones lack)
        model.broadcast_buffers = False

    def batch_to_device(x, y):
        return to_device(x, y, device)

    eval_sets, described = evaluation_sets({"train": train_shards, "val": val_shards}, cfg, launch, batch_to_device)
    say(described)
    byte_lengths = torch.as_tensor(tokenizer.byte_lengths(), device=device) if tokenizer is not None else None
    hellaswag_share = load_hellaswag_share(cfg, tokenizer, launch, device, say) if cfg.hellaswag else None
    peak = cfg.peak_flops or (peak_flops_for(torch.cuda.get_device_name(device)) if device_type == "cuda" else None)

    # only rank 0 touches the file system; the other ranks never wait on a write they do not need. eval_only writes
    # nothing: its one evaluation would be a second record of a step already in the log, of a run it does not extend
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    log_file, wandb_run, log_error = None, None, None
    if launch.is_master and not cfg.eval_only:
        if cfg.wandb_log:  # first: a wandb that cannot start leaves the log as it was
            wandb_run = start_wandb(cfg, wandb_id)
            wandb_id = wandb_run.id
        os.makedirs(cfg.out_dir, exist_ok=True)
        if resume:
            branch = set_aside_later(cfg.out_dir, step, log_path)
            if branch:
                say(branch)
            trim_log(log_path, step)
        elif os.path.exists(log_path) and started_only(log_path):  # of a run stopped before its first step
            os.remove(log_path)
        elif os.path.exists(log_path):  # of a run stopped before its first checkpoint: kept, this run starts anew
            kept = keep_aside(log_path)
            say(f"note: {log_path} of an earlier run that saved no checkpoint is kept as {kept}")
        log_file = open(log_path, "a", encoding="utf-8")
    plot = cfg.plot and log_file is not None and matplotlib_available(say)
    writer = Writer(background=cfg.async_save)

    def log(record, to_wandb=True):
        nonlocal log_file, log_error
        if log_file:
            try:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            except OSError as e:  # a full disk: the run stops at the next vote, on every rank (as a failed save)
                log_error = disk_error(f"could not append to {log_path}", e, ckpt_path)
                try:
                    log_file.close()  # flushes what is left, which fails again
                except OSError:
                    pass
                log_file = None
        if wandb_run and to_wandb:
            wandb_run.log(record, step=record["step"])

    def write_failed():
        return writer.failed() or log_error is not None

    def save(sampler_state, reason):
        """Every rank takes part (the RNG states are gathered); rank 0 writes, by default in the background."""
        nonlocal saved_step
        saved_step = step
        rngs = gather_to_master(rng_state(device), launch)
        if sharded:  # every rank's share of the optimizer state, gathered on rank 0 in the format of an unsharded one
            optimizer.consolidate_state_dict(to=0)
        if launch.is_master:
            # the previous checkpoint is complete before the next one is taken: one in memory at most. Its failure is
            # not raised here, on rank 0 alone, but at the next vote, on every rank
            writer.wait(raise_error=False)
            if writer.failed():
                return
            state = {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "model_args": model_args, "step": step, "best_val_loss": best_val_loss,
                "config": dataclasses.asdict(cfg), "meta": meta, "sampler": sampler_state, "rng": rngs,
                "wandb_run_id": wandb_id, "tokens_seen": tokens_seen, "evaluated": last_eval == step,
                "spikes": spikes.state_dict(), "keep_every": keep_every, "val_data": val_data, "train_data": train_data,
                "config_files": config_files,
            }
            if sharded:
                forget_gathered_state(optimizer)
            if writer.background:
                state = snapshot(state)  # this step's weights, while the next steps update them in place
            writer.submit(write_checkpoint, state, reason)

    def write_checkpoint(state, reason):
        # not by inode, which FUSE mounts may renumber: a folder moved or removed is no longer there
        if not os.path.isdir(cfg.out_dir):  # a save would make a new, empty folder there: the run in two
            raise UserError(f"{cfg.out_dir} was moved or removed while this run was going, its checkpoints and log "
                            "with it: a save would start another folder by that name, and the run would go on in two; "
                            "resume it where it is now: --out_dir=<its new place> --init_from=auto")
        try:
            save_training_checkpoint(cfg.out_dir, state, state["step"], cfg.keep_last_n, state["keep_every"],
                                     best=not cfg.always_save_checkpoint and reason in (IMPROVED, FIRST_VAL))
        except (OSError, RuntimeError) as e:
            # torch.save's zip writer reports a full disk as "[enforce fail at inline_container.cc:...] unexpected
            # pos" (or "PytorchStreamWriter failed writing"); any other RuntimeError is a real error, with its trace
            if isinstance(e, RuntimeError) and not ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)):
                raise
            raise disk_error(f"could not write a checkpoint to {cfg.out_dir}", e, ckpt_path) from None
        best = "" if cfg.always_save_checkpoint else f"; also {BEST}" if reason in (IMPROVED, FIRST_VAL) else \
            f"; the best val loss stays in {BEST}" if os.path.exists(os.path.join(cfg.out_dir, BEST)) else ""
        say(f"saved checkpoint {ckpt_path} at step {state['step']} ({reason}{best})")

    def write_plot():
        nonlocal plot
        if not plot:  # queued before an earlier plot found matplotlib broken
            return
        try:
            plot_losses(log_path, os.path.join(cfg.out_dir, "loss.png"))
        except Exception as e:  # a matplotlib installed but broken, a full disk: the plot is not worth the run
            plot = False
            say(f"plot: off ({type(e).__name__}: {e})")

    def last_write_agreed(status):
        """Before the ranks exit: no rank goes before rank 0 has written (launchers kill the rest on the first exit),
        and every rank learns whether the write succeeded, to exit alike."""
        writer.wait(raise_error=False)
        return agree(WRITE_FAILED if write_failed() else status, launch, device)

    # the settings of this run (or of this stretch of it, after a resume) and where each changed one came from: runs
    # are told apart, and compared, from their log.jsonl alone
    log({"step": step, "start": {"time": time.time(), "world_size": launch.world_size, "torch": torch.__version__,
                                 "config": dataclasses.asdict(cfg), "sources": sources}}, to_wandb=False)
    batches = Prefetcher(sampler, batch_to_device)
    t_last, steps_since_log, bad_steps = time.time(), 0, 0

    def spiked(loss_sum, grad_norm):  # the values of the whole step: the loss's mean over ranks (one more all-reduce)
        return spikes.check({"loss": reduce_mean(loss_sum, launch).item(), "grad_norm": grad_norm.item()})

    exit_code = 0
    try:
        while True:
            due = step % cfg.eval_interval == 0 or step == cfg.max_iters
            losses, bits_per_byte = {}, None
            if cfg.eval_only or (due and step != last_eval):
                last_eval = step
                for split, split_batches in eval_sets.items():
                    scored = estimate_loss(model, split_batches, autocast, launch, lambda: stop.signal is not None,
                                           byte_lengths)
                    losses[split] = scored and scored[0]
                    if scored is None:
                        break
                    if split == "val":
                        bits_per_byte = scored[1]
            if hellaswag_share is not None and losses and None not in losses.values():
                raw_model.eval()  # uncompiled: its shapes change at every pass
                with fast_kernels(device, "flash")[0]:  # not cuDNN's attention, which plans anew for every shape
                    scored = hellaswag.accuracy(raw_model, hellaswag_share, cfg.batch_size, device, autocast, launch,
                                                stopping=lambda: stop.signal is not None)
                raw_model.train()
                losses["hellaswag"] = scored and scored["acc_norm"]
            abandoned = None in losses.values()
            if abandoned:  # a stop signal on some rank: it is handled below, without this evaluation
                say(f"step {step}: evaluation abandoned to stop")
                last_eval, losses = None, {}  # not evaluated: a run resumed from this step evaluates it
            elif losses:
                if bits_per_byte is not None:
                    losses["val_bpb"] = bits_per_byte
                say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" +
                    (f" ({losses['val_bpb']:.4f} bits per byte)" if "val_bpb" in losses else "") +
                    (f", hellaswag {losses['hellaswag']:.4f}" if "hellaswag" in losses else ""))
                record = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                          **({"val_bpb": losses["val_bpb"]} if "val_bpb" in losses else {}),
                          **({"hellaswag": losses["hellaswag"]} if "hellaswag" in losses else {}),
                          "tokens": tokens_seen, "elapsed": time.time() - t_start, "time": time.time()}
                log(record)
                if cfg.eval_only:
                    say(json.dumps(record))
                improved = losses["val"] < best_val_loss
                why = "always_save_checkpoint" if not improved else IMPROVED if best_val_loss < float("inf") else \
                    FIRST_VAL
                best_val_loss = min(best_val_loss, losses["val"])
                if step > 0 and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
                    save(batches.state_dict(), why)
                if plot:
                    writer.submit(write_plot)
                if sample_from is not None and step > 0 and launch.is_master:  # while the checkpoint is written
                    text = draw_sample(raw_model, *sample_from, cfg.sample_tokens, tokenizer, autocast, cfg.seed)
                    say(f"step {step}: sample\n{text}\n" + "-" * 15)
                    log({"step": step, "sample": text}, to_wandb=False)  # a string, which wandb charts do not take
                t_last = time.time()  # evaluation (and sampling) time is not training time
            if cfg.save_interval and step % cfg.save_interval == 0 and step > saved_step and not cfg.eval_only:
                save(batches.state_dict(), f"save_interval={cfg.save_interval}")  # unless this evaluation saved
            done = (step >= cfg.max_iters or cfg.eval_only) and not abandoned
            if done:
                status = last_write_agreed(GO_ON)  # the final checkpoint, if this evaluation wrote one
            else:
                out_of_time = max_runtime is not None and time.time() - t_start > max_runtime
                mine = stop.signal or ("max_runtime" if out_of_time else None)
                # a checkpoint write that failed (in the background, or in save on rank 0) stops every rank now: rank 0
                # alone would leave the others waiting in their next collective for the process group's timeout
                status, agreed = agree_each([WRITE_FAILED if write_failed() else STOP if mine else GO_ON,
                                             STOP_REASONS.index(mine)], launch, device)
                why = STOP_REASONS[agreed]
                if status == STOP:
                    reason = f"stopping on {why}"
                    if step != saved_step:
                        save(batches.state_dict(), reason)
                    else:  # before the first step (a Ctrl-C while compiling), or just after a save of this step
                        say(f"{reason}: {'nothing trained yet' if step == 0 else 'saved already'}")
                    status = last_write_agreed(STOP)
            if status == WRITE_FAILED:
                writer.check()  # rank 0: raises the write's error
                if log_error is not None:
                    raise log_error
                raise SystemExit(2)  # the other ranks: rank 0 says why
            if status == STOP:
                again = ("the same command" if cfg.init_from in ("auto", "resume") or resumable else
                         "the same command with --init_from=auto")  # from scratch, it would refuse this out_dir
                exit_code = EXIT_INTERRUPTED if why == "SIGINT" else EXIT_REQUEUE
                if launch.distributed:  # the launcher may signal the ranks that have not exited yet
                    stop.leaving()
                what = (f"run {again} to resume" if step > 0 else
                        "nothing trained to resume; the same command starts anew")
                say(f"exiting with code {exit_code}: {what}" +
                    ("" if exit_code != EXIT_REQUEUE else " (torchrun reports any code but 0 as a failure, and exits 1)"
                     if launch.mode == "torchrun" else " (slurm/train.sbatch requeues itself, unless the job was "
                     "cancelled)"))
                break
            if done:
                break

            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, grad_norm, skipped = accumulate_gradients(model, batches, grad_accum, autocast, scaler, optimizer,
                                                                cfg.grad_clip, launch.distributed,
                                                                spiked if cfg.skip_spikes > 0 else None)
            if skipped == "non-finite":  # every rank sees the same all-reduced norm and takes the same decision
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.update()  # fp16: lowers the loss scale, which is the usual cause
                what = f"loss {loss_sum.item()}, gradient norm {grad_norm.item()}"
                say(f"step {step}: non-finite {what}; step skipped ({bad_steps} in a row)")
                log({"step": step, "skipped": True, "bad_steps": bad_steps})
                if bad_steps >= cfg.max_bad_steps:
                    raise UserError(f"stopping: {bad_steps} steps in a row up to step {step} had a non-finite loss or "
                                    f"gradient ({what}); nothing was saved from them. Lower learning_rate or resume "
                                    "from the last checkpoint")
                continue
            if skipped:  # a spike, judged alike on every rank (all-reduced loss and norm). Not one of max_bad_steps:
                # its values join the window, so a lasting change of level stops being skipped of itself
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                say(f"step {step}: a spike, {skipped}; step skipped")
                log({"step": step, "skipped": True, "spike": skipped, "loss": spikes.history["loss"][-1],
                     "grad_norm": spikes.history["grad_norm"][-1], "tokens": tokens_seen})
                continue
            bad_steps = 0
            step += 1
            tokens_seen += tokens_per_step
            steps_since_log += 1

            if step % cfg.log_interval == 0:
                loss_value = reduce_mean(loss_sum, launch).item()  # the true mean over micro-steps and ranks
                dt = (time.time() - t_last) / steps_since_log
                tokens_per_sec = tokens_per_step / dt
                mfu = raw_model.estimate_mfu(tokens_per_sec / launch.world_size, peak)
                # the sampler's state before the batch in hand: after the batches of `step` steps
                epoch = {"epoch": EpochSampler.epochs_done(batches.state_dict())} if cfg.data_order == "epochs" else {}
                say(f"step {step} | loss {loss_value:.4f} | lr {lr:.2e} | norm {grad_norm.item():.3f} | "
                    f"{dt * 1000:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {f'{mfu:.1%}' if mfu else '-'}" +
                    (f" | epoch {epoch['epoch']:.3f}" if epoch else ""))
                log({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "ms": dt * 1000,
                     "tokens_per_sec": tokens_per_sec, "mfu": mfu, "tokens": tokens_seen, **epoch,
                     "elapsed": time.time() - t_start, "time": time.time()})
                t_last, steps_since_log = time.time(), 0
    except BaseException:
        writer.close(report_only=True)  # what is being written completes; the loop's error is the one raised
        if log_file:
            try:
                log_file.close()
            except OSError:  # a full disk: the loop's error is the one to see
                pass
        # the traceback keeps the frames of the closures it went through, the evaluation's comprehension among them,
        # and those keep `model`: emptied here, the DDP model goes before main leaves the process group
        model = None  # noqa: F841
        raise
    writer.close()  # every checkpoint complete before the process reports success or exits to be requeued
    if log_file:
        log_file.close()
    if wandb_run:
        wandb_run.finish()
    if exit_code:
        raise SystemExit(exit_code)  # main leaves the process group, once the model is gone
    return best_val_loss


def pretrained_name(cfg):
    """The GPT-2 weights (a name or a Hugging Face folder) a run starts from, or None."""
    return cfg.init_from if cfg.init_from not in ("scratch", "resume", "auto") else None


def refuse_to_overwrite(out_dir, ckpt_path):
    """A run that does not resume must not start in the folder of an earlier run's checkpoints: its first save would
    replace that run's ckpt.pt, and the earlier numbered checkpoints would mix with its own."""
    numbered = step_checkpoints(out_dir)
    if os.path.isfile(ckpt_path) and written_by_nanogpt(ckpt_path):  # --init_from=auto would refuse it (a trial)
        raise UserError(f"{ckpt_path} is a nanoGPT checkpoint, which holds no training state to resume: train on "
                        f"from its weights in another --out_dir with --init_from={ckpt_path}, or sample from it")
    if os.path.isfile(ckpt_path):
        how = "continue it with --init_from=auto"
    elif numbered:  # ckpt.pt deleted by hand
        how = f"continue it from its latest with ln -f {numbered[-1][1]} {ckpt_path} and --init_from=auto"
    else:
        return
    raise UserError(f"{out_dir} holds the checkpoints of an earlier run: {how}, or start over in a new --out_dir "
                    f"(or delete {out_dir} first)")


def told_apart(a, b):
    """Two different floats written with as few significant digits (3 at least) as tell them apart: a trial was told
    a learning rate 'is 0.0001, not 0.0001'."""
    digits = next((d for d in range(3, 17) if f"{a:.{d}g}" != f"{b:.{d}g}"), 17)
    return f"{a:.{digits}g}", f"{b:.{digits}g}"


def written_by_nanogpt(path):
    """Whether a checkpoint is nanoGPT's (no tokenizer, no training state of ours in it), told without reading its
    tensors into memory."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # a damaged one: the resume says so
        return False
    return isinstance(checkpoint, dict) and "model" in checkpoint and "meta" not in checkpoint


def free_name(path):
    """`path` (dir/name.ext) if nothing is there, else the first free dir/name.N.ext, N = 1, 2, ..."""
    stem, ext = os.path.splitext(path)
    name, n = path, 1
    while os.path.exists(name):
        name, n = f"{stem}.{n}{ext}", n + 1
    return name


def keep_aside(path):
    """Rename `path` to the first free dir/name.N.ext (see free_name); returns the new name."""
    kept = free_name(path)
    os.rename(path, kept)
    return kept


def disk_error(what, error, ckpt_path):
    cause = ""
    if isinstance(error, RuntimeError):  # torch's zip writer says only where a write stopped short
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(ckpt_path))).free
            cause = f": the disk is probably full ({free / 2**20:,.1f} MiB free there now, the unfinished file removed)"
        except OSError:
            cause = ": the disk is probably full"
    if not os.path.isfile(ckpt_path):  # the run's first save (a trial was told to resume a run that had none)
        return UserError(f"{what} ({error}){cause}; nothing was saved yet: free some space or fix the folder, then run "
                         "the same command again")
    return UserError(f"{what} ({error}){cause}; {ckpt_path} is a complete checkpoint (this save's, when only a link "
                     "of it failed): free some space or fix the folder, then resume with --init_from=resume")


def matplotlib_available(say):
    # looked up, not imported: the import (0.3 s, 0.75 s with the figure module) happens on the writer thread
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    say("plot: off (matplotlib is not installed: pip install matplotlib)")
    return False


if __name__ == "__main__":
    configurator.run(main, TrainConfig, validate)
