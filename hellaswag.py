"""
HellaSwag (Zellers et al. 2019), the sentence-completion benchmark GPT-2 reproductions report: each item is a context
and (usually four) endings, one of them right. A model's choice is the ending with the lowest mean token loss after
the context (acc_norm, as in the GPT-2 and GPT-3 reports) or the lowest summed loss (acc). evaluate.py
--task=hellaswag scores a model once; train.py --hellaswag=True scores it at each of its evaluations.
"""

import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from configurator import UserError
from distributed import all_reduce_sum

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def default_path(data_root):
    return os.path.join(data_root, "hellaswag", "hellaswag_val.jsonl")


def fetch(path, offline_hint):
    """The validation file at `path`, downloaded there the first time; offline, the error adds `offline_hint`."""
    if not os.path.exists(path):
        from prepare import download
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        download(URL, path, offline_hint)
    return path


def first_items(path, n):
    """The first n items of a HellaSwag file (n 0: all of them), and a note when it holds fewer than n, or None."""
    items = read_items(path)
    if n > len(items):
        return items, f"note: {path} holds {count(len(items))}, fewer than the {n:,} asked for: all of them are scored"
    return items[:n or None], None


def count(n):
    return f"{n:,} item{'s' * (n != 1)}"


def label_of(value):
    """An item's label, a whole number as HellaSwag's file has it (or its digits, as the Hub's copy does); a float or
    true is no label (int() made 1.7 and true a 1: a trial)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {value!r}")
    return int(value)


def read_items(path):
    """(context, endings, label, line number) of each item of a HellaSwag jsonl file; anything else is refused by its
    line number."""
    import json
    items = []
    with open(path, "rb") as f:  # decoded line by line: a byte that is not UTF-8 is named by its line
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8"))
                context, endings, label = item["ctx"], item["endings"], label_of(item["label"])
                if not (isinstance(context, str) and isinstance(endings, list) and len(endings) >= 2
                        and all(isinstance(e, str) for e in endings) and 0 <= label < len(endings)):
                    raise ValueError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError):
                raise UserError(f"{path}:{n} is not a HellaSwag item: expected a JSON object with ctx (text), "
                                "endings (a list of 2 or more texts) and label (the index of the right ending)") \
                    from None
            items.append((context, endings, label, n))
    if not items:
        raise UserError(f"{path} holds no HellaSwag items")
    return items


def tokenize(items, tokenizer, path):
    """Each item as (context ids, [ending ids], label), arrays; an item the tokenizer cannot write is named."""
    out = []
    for context, endings, label, line in items:
        try:
            ctx = tokenizer.encode(context)
            ends = [tokenizer.encode(" " + e) for e in endings]  # the space joins an ending on, as GPT-2 saw text
        except UserError as e:
            raise UserError(f"{path}:{line}: {e}") from None
        if not ctx:  # an ending's first token needs something before it: end-of-text, a document's start
            if tokenizer.eot_id is None:
                raise UserError(f"{path}:{line}: the item has an empty ctx, and this model's tokenizer has no "
                                "end-of-text token to stand for it: give it a context")
            ctx = [tokenizer.eot_id]
        out.append((np.array(ctx, dtype=np.int64), [np.array(e, dtype=np.int64) for e in ends], label))
    return out


def share(items, tokenizer, path, launch, block_size):
    """
    This rank's share of the items, tokenized, and a note naming how many are longer than the model's block_size
    (their contexts lose their start, as scores() crops them), or None. Every rank tokenizes every item, so each
    counts the same and a bad item is refused on all of them.
    """
    tokenized = tokenize(items, tokenizer, path)
    long = sum(any(len(ctx) + len(end) > block_size + 1 for end in ends) for ctx, ends, _ in tokenized)
    note = (f"note: {long:,} of the {count(len(items))} {'are' if long != 1 else 'is'} longer than the model's "
            f"{block_size:,}-token block_size: the start of {'their contexts is' if long != 1 else 'its context is'} "
            "cut off to fit") if long else None
    return tokenized[launch.rank::launch.world_size], note


@torch.no_grad()
def scores(model, chunk, device, autocast):
    """
    For tokenized items: (summed NLL, mean NLL) of every ending given the context, as (items, most endings) tensors;
    an item with fewer endings than the most has inf in the places it lacks, which argmin passes by.
    """
    rows, spans = [], []
    for ctx, ends, _ in chunk:
        for end in ends:
            seq = np.concatenate([ctx, end])[-(model.config.block_size + 1):]  # keep the ending; crop the context
            rows.append(seq)
            spans.append(min(len(end), len(seq) - 1))  # a first token with no context before it cannot be scored
    T = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (seq, n) in enumerate(zip(rows, spans)):
        seq = torch.from_numpy(seq)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(seq) - 1 - n:len(seq) - 1] = seq[len(seq) - n:]  # only the ending's tokens count
    with autocast:
        nll = model(x.to(device), y.to(device), reduction="none")[1].sum(dim=1).float().cpu()
    mean = nll / torch.tensor(spans, dtype=torch.float32)
    counts = [len(ends) for _, ends, _ in chunk]
    totals, means = torch.full((2, len(chunk), max(counts)), math.inf)
    item = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor(counts))
    ending = torch.cat([torch.arange(c) for c in counts])
    totals[item, ending], means[item, ending] = nll, mean
    return totals, means


@torch.no_grad()
def accuracy(model, mine, batch_size, device, autocast, launch, progress=False, stopping=None):
    """
    {'items', 'acc_norm', 'acc'} over every rank's share (`mine`: this rank's tokenized items), in `batch_size` items
    per forward pass; None on every rank when `stopping()` turned true on one (it is asked between passes).
    """
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # right by sum, right by mean, items, abandoned
    for i in tqdm(range(0, len(mine), batch_size), desc="hellaswag", unit="batch", disable=not progress,
                  file=sys.stderr, leave=False):
        if stopping is not None and stopping():
            counts[3] = 1
            break
        chunk = mine[i:i + batch_size]
        total, mean = scores(model, chunk, device, autocast)
        labels = torch.tensor([label for _, _, label in chunk])
        counts += torch.tensor([(total.argmin(1) == labels).sum().item(), (mean.argmin(1) == labels).sum().item(),
                                len(chunk), 0], dtype=torch.float64, device=device)
    right_sum, right_mean, n, abandoned = all_reduce_sum(counts, launch).tolist()
    if abandoned:
        return None
    return {"items": int(n), "acc_norm": right_mean / n, "acc": right_sum / n}
