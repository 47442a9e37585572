"""
Generate text from a trained model or from GPT-2:

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --temperature=0 --stream
    python sample.py --init_from=gpt2 --start="The meaning of life is" --num_beams=4 --num_samples=2

Decoding runs on a KV cache (generate.py): greedy (--temperature=0), temperature with top-k and top-p, or beam
search (--num_beams). The prompt is encoded, and the samples decoded, with the model's own tokenizer. Samples go to
stdout; everything else to stderr, so `> out.txt` keeps just the text.
"""

import json
import re
import sys
import time
from dataclasses import dataclass

import torch

import configurator
from configurator import UserError
from distributed import pick_device, pick_dtype
from generate import TEMPERATURE, TOP_K, Stop, beam_search, generate
from inference import load_model, model_label, model_notes, prompt_ids, read_prompt


@dataclass
class SampleConfig:
    init_from: str = "resume"  # 'resume' (out_dir's checkpoint), another checkpoint (a .pt file, or a run's folder holding ckpt.pt), or gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder
    out_dir: str = "out"  # the folder holding ckpt.pt
    start: str = "\n"  # the prompt, or FILE:path to read it from a file; empty: end-of-text, a document's start (for a corpus of separate documents)
    num_samples: int = 3  # samples, generated as one batch (with beam search: the best hypotheses)
    max_new_tokens: int = 500  # tokens generated per sample, at most
    temperature: float = TEMPERATURE  # 1.0 samples the model's distribution; lower is more conservative; 0 is greedy
    top_k: int = TOP_K  # sample only from the k most likely tokens; 0 disables
    top_p: float = 1.0  # sample only from the most likely tokens holding this much probability; 1.0 disables
    num_beams: int = 1  # beam search with this many beams (deterministic; sampling settings unused); 1: sampling
    length_penalty: float = 1.0  # beam search: scores are log-probability / length**length_penalty; > 0 favours long
    early_stopping: bool = True  # beam search: end once num_beams hypotheses have ended, not at max_new_tokens
    stop: str = ""  # a string that ends a sample (\n: newline, \t: tab), or a JSON list of strings and token ids: '["\n\n", 50256]'
    stream: bool = False  # print the first sample as it is generated, the others when all are done (no beam search)
    compile: bool = False  # decode through torch.compile and a static KV cache (CUDA graphs on GPU): the first call compiles, long generations then run faster
    verbose: bool = False  # report the generation speed at the end
    seed: int = 1337  # the same seed on the same device gives the same samples
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'mps'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def parse_stop(stop):
    r"""
    --stop as (strings, token ids): a JSON list of strings and ints, or one plain string, in which \n, \t and \\ are
    a newline, a tab and a backslash (a shell passes --stop="\n\n" as backslashes, which no sample would contain).
    """
    if not stop.startswith("["):
        return ([re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], stop)] if stop else []), []
    try:
        items = json.loads(stop)
    except json.JSONDecodeError as e:
        raise UserError(f"--stop={stop}: not a JSON list ({e.msg}); e.g. --stop='[\"\\n\\n\", 50256]'") from None
    if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
        raise UserError(f"--stop={stop}: the list may hold only strings and token ids")
    if "" in items:
        raise UserError(f"--stop={stop}: an empty string would never stop a sample")
    return [i for i in items if isinstance(i, str)], [i for i in items if isinstance(i, int)]


def validate(cfg):
    problems = configurator.too_small(cfg, ("max_new_tokens", "num_samples", "num_beams"), 1)
    problems += configurator.too_small(cfg, ("temperature", "top_k", "seed"), 0)
    if not 0.0 < cfg.top_p <= 1.0:
        problems.append(f"top_p={cfg.top_p} must be in (0, 1]")
    if cfg.num_beams > 1 and cfg.num_samples > cfg.num_beams:
        default = " (its default)" if cfg.num_samples == SampleConfig.num_samples else ""
        problems.append(f"num_samples={cfg.num_samples}{default} is more than num_beams={cfg.num_beams} hypotheses: "
                        f"pass --num_samples={cfg.num_beams} or fewer for the best ones")
    if cfg.stream and cfg.num_beams > 1:
        problems.append("stream=True cannot show beam search as it goes (the best hypothesis changes): use "
                        "num_beams=1")
    try:
        parse_stop(cfg.stop)
    except UserError as e:
        problems.append(str(e))
    return problems


class Streamer:
    """Prints row 0's text as it grows, holding back what could still become a stop string or half a character."""

    def __init__(self, decode, stop):
        self.decode, self.stop, self.printed = decode, stop, 0
        self.hold = max((len(s) for s in stop.strings), default=1) - 1

    def __call__(self, new):
        text = self.decode(new[0])
        cut = self.stop.cut(text)
        if cut != text:  # the stop string is complete: the sample is final
            ready = len(cut)
        else:
            ready = len(text) - self.hold - (1 if text.endswith("\ufffd") else 0)  # a multi-byte char split by BPE
        if ready > self.printed:
            print(text[self.printed:ready], end="", flush=True)
            self.printed = ready

    def finish(self, text):
        print(text[self.printed:], flush=True)


# the keys each way of decoding leaves unread: beam search and greedy decoding draw nothing at random
UNUSED_BY = {"beam search": ("temperature", "top_k", "top_p", "seed"),
             "greedy decoding": ("top_k", "top_p", "seed", "length_penalty", "early_stopping"),
             "sampling": ("length_penalty", "early_stopping")}


def main(cfg, sources):
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    model, tokenizer, train_config = load_model(cfg.init_from, cfg.out_dir, device)
    if cfg.num_beams > model.config.vocab_size:  # more than the first step can fill, and a (beams, vocab) score
        # table per step that a trial's 60,000 beams of GPT-2's vocabulary ran out of memory on
        raise UserError(f"num_beams={cfg.num_beams} is more than the model's {model.config.vocab_size:,} tokens; "
                        "a few (4 to 16) is the usual beam search")

    prompt = read_prompt(cfg.start)
    ids = prompt_ids(tokenizer, prompt, f"--start={cfg.start}" if cfg.start.startswith("FILE:") else "--start")
    strings, stop_ids = parse_stop(cfg.stop)
    outside = [i for i in stop_ids if not 0 <= i < tokenizer.vocab_size]
    if outside:
        raise UserError(f"--stop={cfg.stop}: token id {outside[0]} is not in this model's vocabulary of "
                        f"{tokenizer.vocab_size} ids (0 to {tokenizer.vocab_size - 1}); no sample could end on it")
    for text in strings:  # a character-level model cannot write a character it never saw
        try:
            tokenizer.encode(text)
        except UserError as e:
            raise UserError(f"--stop: no sample could ever end on {text!r}: {e}") from None
    if tokenizer.eot_id is not None:
        stop_ids.append(tokenizer.eot_id)  # a sample ends where its document would
    stop = Stop(stop_ids, strings, tokenizer.decode)

    kind = "beam search" if cfg.num_beams > 1 else "greedy decoding" if cfg.temperature == 0 else "sampling"
    unused = [k for k in UNUSED_BY[kind] if k in sources]  # given, and nothing reads them: say so, not ignore them
    if unused:
        print(f"note: {kind} does not use {', '.join('--' + k for k in unused)}", file=sys.stderr)
    if kind == "beam search":
        how = (f"beam search, {cfg.num_beams} beams, length penalty {cfg.length_penalty}, "
               f"{'early stopping' if cfg.early_stopping else 'no early stopping'}")
    elif kind == "greedy decoding":
        how = "greedy"
    else:
        how = f"sampling at temperature {cfg.temperature}, top_k {cfg.top_k or 'off'}, top_p {cfg.top_p}"
    print(f"{model_label(cfg.init_from, cfg.out_dir, train_config)}: {len(ids)}-token prompt, {how}, on {device} in "
          f"{dtype}{', compiled' if cfg.compile else ''}", file=sys.stderr)
    for note in model_notes(cfg, sources):
        print(note, file=sys.stderr)
    if len(ids) > model.config.block_size:
        print(f"note: the prompt's {len(ids):,} tokens are more than the model's context: each new token is predicted "
              f"from the last {model.config.block_size} only", file=sys.stderr)
    if kind == "greedy decoding" and cfg.num_samples > 1:
        print(f"note: greedy decoding writes the same text {cfg.num_samples} times; for different samples give a "
              f"--temperature above 0, or --num_beams={cfg.num_samples} for the {cfg.num_samples} likeliest",
              file=sys.stderr)

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))
    streamer = Streamer(tokenizer.decode, stop) if cfg.stream else None
    if streamer:
        print(prompt, end="", flush=True)
    t0 = time.time()
    with autocast:
        if cfg.num_beams > 1:
            hypotheses = beam_search(model, ids, cfg.max_new_tokens, cfg.num_beams, cfg.length_penalty,
                                     cfg.early_stopping, stop, compile=cfg.compile)
            samples = [tokens for _, tokens in hypotheses[:cfg.num_samples]]
        else:
            samples = generate(model, [ids] * cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                               cfg.top_p, stop, generator, on_step=streamer, compile=cfg.compile)
    if device_type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0

    rest = samples
    if streamer:  # the first sample as it grew; the others once the batch is done
        streamer.finish(stop.cut(tokenizer.decode(samples[0])))
        print("---------------")
        rest = samples[1:]
    for tokens in rest:
        print(prompt + stop.cut(tokenizer.decode(tokens)))
        print("---------------")
    if cfg.verbose:
        n = sum(len(tokens) for tokens in samples)
        print(f"{n} new tokens in {seconds:.2f} s: {n / seconds:,.1f} tokens/s "
              f"({len(samples)} sample(s), prefill{' and compilation' if cfg.compile else ''} included)", file=sys.stderr)


if __name__ == "__main__":
    configurator.run(main, SampleConfig, validate)
