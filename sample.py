"""
Generate text from a trained model:

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt

The prompt is encoded, and the samples decoded, with the tokenizer the checkpoint was trained with.
"""

from dataclasses import dataclass

import torch

import configurator
from checkpoint import load_checkpoint, model_from_checkpoint
from configurator import UserError
from tokenizer import tokenizer_from_meta
from distributed import pick_device, pick_dtype


@dataclass
class SampleConfig:
    out_dir: str = "out"  # the folder holding ckpt.pt
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3  # samples to draw
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 samples the model's distribution; lower is more conservative; 0 is greedy
    top_k: int = 200  # sample only from the k most likely tokens; 0 disables
    seed: int = 1337
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'mps'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'


def validate(cfg):
    problems = []
    if cfg.max_new_tokens < 1:
        problems.append(f"max_new_tokens={cfg.max_new_tokens} must be at least 1")
    if cfg.num_samples < 1:
        problems.append(f"num_samples={cfg.num_samples} must be at least 1")
    if cfg.temperature < 0:
        problems.append(f"temperature={cfg.temperature} cannot be negative")
    if cfg.top_k < 0:
        problems.append(f"top_k={cfg.top_k} cannot be negative")
    return problems


def read_prompt(start):
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {start[5:]}: {e.strerror}") from None
    return start


def main(cfg, sources):
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    checkpoint = load_checkpoint(cfg.out_dir)
    model = model_from_checkpoint(checkpoint, dropout=0.0)
    tokenizer = tokenizer_from_meta(checkpoint["meta"])
    model.eval().to(device)
    del checkpoint

    prompt = read_prompt(cfg.start)
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise UserError("the prompt is empty and this tokenizer has no end-of-text token to start from; "
                            "give --start=\"some text\"")
        ids = [tokenizer.eot_id]
    torch.manual_seed(cfg.seed)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :].repeat(cfg.num_samples, 1)
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))
    with autocast:
        y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    for row in y.tolist():
        print(tokenizer.decode(row))
        print("---------------")


if __name__ == "__main__":
    configurator.run(main, SampleConfig, validate)
