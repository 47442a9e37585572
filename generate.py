"""
Decoding: turning a model's next-token logits into text, on a KV cache. The one implementation that sample.py,
bench.py and the tests use.

- `generate`: greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling, several prompts of different
  lengths in one batch, stop tokens and stop strings.
- `beam_search`: beam search with a length penalty and early stopping at end-of-text.
Both run on a `Decoder`, which holds the sequences and their KV cache and slides the context window when a sequence
outgrows block_size; with compile=True it decodes through a static cache and a compiled step (`decode_step`), CUDA
graphs on GPU. The logit filters (`top_k_filter`, `top_p_filter`) are pure functions.
"""

import functools
import weakref

import torch
from torch.nn import functional as F

from distributed import fast_kernels

# sampling's defaults (nanoGPT's): sample.py's, and those of the samples train.py prints at its evaluations
TEMPERATURE, TOP_K = 0.8, 200


def top_k_filter(logits, k):
    """
    Keep exactly the k largest logits of each row (B, V), the rest -inf. Ties at the k-th place go to the lower token
    id (a stable sort), so exactly k candidates remain even when many logits are equal.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    keep = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return torch.full_like(logits, float("-inf")).scatter(1, keep, logits.gather(1, keep))


def top_p_filter(logits, p):
    """
    Nucleus filtering (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"): keep the smallest set
    of most likely tokens whose probability reaches p, the rest -inf. A token stays when the tokens more likely than
    it hold less than p; the most likely token always stays.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = F.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop = (before >= p).scatter(1, order, before >= p)  # back from rank order to token order
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token id per row of logits (B, V): argmax at temperature 0, else a draw after temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # in float32, from the largest logit down: float16 logits (fp16 autocast) divided by a low temperature would
    # overflow to inf past 65,504, and the softmax turn to NaN; the shift changes no probability
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


class Stop:
    """
    What ends a sample: one of the token ids `ids` (end-of-text, say), which is not kept, or text containing one of
    `strings`; `decode` turns token ids into that text. `cut` removes a stop string and everything after it.
    """

    def __init__(self, ids=(), strings=(), decode=None):
        self.ids, self.strings, self.decode = set(ids), [s for s in strings if s], decode
        assert decode is not None or not self.strings, "stop strings need a decode function"

    def in_text(self, tokens):
        if not self.strings:
            return False
        text = self.decode(tokens)
        return any(s in text for s in self.strings)

    def cut(self, text):
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[:min(ends)] if ends else text


NO_STOP = Stop()


def decode_step(model, idx, cache):
    """One decoding step on a static KVCache: next-token logits (B, V) for idx (B, 1). Compiled by compiled_step."""
    logits, _ = model(idx, cache=cache)
    return logits[:, -1, :]


@functools.cache
def compiled_step():
    """
    decode_step under torch.compile, built once per process. reduce-overhead captures a step as a CUDA graph that is
    replayed at every step, so a step costs one graph launch instead of hundreds of kernel launches from Python (the
    limit at batch 1); static shapes, since each shape is a graph of its own. Each batch size and cache length is
    one compilation, so a notebook or bench.py soon passes torch's default of 8 per function, which with fullgraph is
    an error, not a fallback: the limit is raised to 64 (a process-wide setting; raising it only allows more).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(decode_step, mode="reduce-overhead", dynamic=False, fullgraph=True)


# each model's last finished static cache, whose storage the next compiled decoding of the same shape takes over: a
# step's CUDA graph was recorded on it and replays as it is, where new storage would record another graph at every
# call (kept by the CUDA-graph tree, which then looks through all of them at each step). One per model, the most
# recent, so that what stays allocated after decoding is one cache, not one per shape.
SPARE_CACHES = weakref.WeakKeyDictionary()


def mark_static(cache):
    """
    Tell torch.compile that the static cache's tensors keep their storage from step to step, so CUDA graphs read and
    write them in place instead of copying them in and out; a new cache (a new call to generate) is re-recorded,
    not recompiled (guard=False).
    """
    for t in cache.k + cache.v + [cache.filled]:
        torch._dynamo.mark_static_address(t, guard=False)


class Decoder:
    """
    A batch of sequences being decoded and the model state that goes with them: `logits` (B, V) are every row's
    next-token logits, `append(ids)` extends each row by one token and computes the next logits.

    Prompts of different lengths are left-padded (the KV cache masks the padding). With use_cache the context is run
    once (prefill), then each step costs one position. Without it every step recomputes the whole context: the
    baseline bench.py measures the cache against. GPT-2's position embeddings are learned and absolute, so once a
    sequence outgrows block_size every token's position in the window changes at each step and no cached key stays
    valid: from there on each step recomputes the last block_size tokens, which is exactly what decoding without a
    cache does.

    compile=True (with use_cache) prefills eagerly into a static cache, then runs each one-token step through
    compiled_step: the first call compiles (tens of seconds on a GPU), which pays off over long or repeated
    generation. Past block_size it falls back to eager recomputation like the dynamic cache.
    """

    def __init__(self, model, prompts, max_new_tokens, use_cache=True, compile=False):
        assert prompts and all(prompts), "every prompt needs at least one token"
        self.model, self.block_size = model, model.config.block_size
        device = model.lm_head.weight.device
        longest = max(len(p) for p in prompts)
        self.tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)  # (B, S), left padded
        for row, prompt in enumerate(prompts):
            self.tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        self.pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long, device=device)  # (B,)
        self.padded = longest > min(len(p) for p in prompts)
        self.cache, self.compile = None, compile and use_cache
        if use_cache and longest < self.block_size:
            # positions the cache will ever hold: the prompt and every generated token but the last; a static
            # cache's length is a shape of the compiled step, so it is rounded up to fewer, reusable sizes
            max_len = longest + max_new_tokens
            max_len = min(self.block_size, -(-max_len // 128) * 128 if self.compile else max_len)
            spare = SPARE_CACHES.pop(model, None) if self.compile else None  # taken: never two decoders on one
            self.cache = model.new_cache(max_len, self.pad, static=self.compile, spare=spare)
            self.logits = self._forward(self.tokens, self.cache)
            if self.compile:
                mark_static(self.cache)
        else:
            self.logits = self._recompute()

    def _forward(self, idx, cache, compiled=False):
        # flash attention first on CUDA, and the memory-efficient kernel for the steps with a mask (a prefill, padded
        # rows, the static cache): decoding changes the attention's shapes at every step, and cuDNN's attention
        # (train.py's first choice on Hopper) builds a new plan for each shape, which made an H100 decode at 15
        # tokens/s (bench.py sample, batch 1)
        with fast_kernels(str(idx.device), "flash")[0]:
            if compiled:  # a one-token step on the static cache, never the prefill (a one-token prompt included):
                # the prefill allocates the cache, which must exist, marked static, before a step is captured
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are no longer needed
                # cloned out of the graph's memory, which the next step overwrites
                return compiled_step()(self.model, idx, cache).clone()
            logits, _ = self.model(idx, cache=cache)
        return logits[:, -1, :]  # (B, V)

    def _recompute(self):
        """Logits from the last block_size positions (the slots are shared, so the longest row decides the window)."""
        shift = max(0, self.tokens.size(1) - self.block_size)
        window = self.tokens[:, shift:]
        if not self.padded:
            return self._forward(window, None)
        pad = (self.pad - shift).clamp(min=0)  # left padding that is still inside the window
        return self._forward(window, self.model.new_cache(window.size(1), pad))  # a throwaway cache for the mask

    def append(self, ids):
        """Extend row b by ids[b] (a (B,) LongTensor) and compute the next logits."""
        self.tokens = torch.cat([self.tokens, ids[:, None]], dim=1)
        if self.cache is not None and self.tokens.size(1) <= self.block_size:
            self.logits = self._forward(ids[:, None], self.cache, compiled=self.compile)
        else:
            self.cache = None  # outgrown: see the class comment
            self.logits = self._recompute()

    def release(self):
        """Decoding is over: a static cache's storage is left for the next compiled decoding (see SPARE_CACHES)."""
        if self.compile and self.cache is not None and self.cache.k is not None:
            SPARE_CACHES[self.model] = self.cache

    def reorder(self, rows):
        """Keep the listed rows, in that order (beam search's surviving beams); rows may repeat."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.tokens.device)
        self.tokens, self.pad, self.logits = self.tokens[rows], self.pad[rows], self.logits[rows]
        if self.cache is not None:
            self.cache.reorder(rows)
            if self.compile:
                mark_static(self.cache)  # reorder allocates new storage when the number of rows changes


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop=NO_STOP, generator=None,
             use_cache=True, on_step=None, compile=False):
    """
    Extend each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens, all rows as one
    batch. Returns each row's new tokens, ended by `stop` (see Stop). on_step(new_tokens) is called after each step
    with every row's tokens so far (for streaming). Use the model in eval() mode; sampling draws from `generator`.
    compile: decode through a compiled step (see Decoder).
    """
    decoder = Decoder(model, prompts, max_new_tokens, use_cache, compile)
    new = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        ids = next_token(decoder.logits, temperature, top_k, top_p, generator)  # (B,)
        for row, token in enumerate(ids.tolist()):
            if done[row]:
                continue
            if token in stop.ids:
                done[row] = True
            else:
                new[row].append(token)
                done[row] = stop.in_text(new[row])
        if on_step:
            on_step(new)
        if all(done) or step == max_new_tokens - 1:
            break
        decoder.append(ids)
    decoder.release()
    return new


@torch.no_grad()
def beam_search(model, prompt, max_new_tokens, num_beams, length_penalty=1.0, early_stopping=True, stop=NO_STOP,
                use_cache=True, compile=False):
    """
    The num_beams most likely continuations of `prompt`, as (score, tokens) pairs, best first. A hypothesis's score
    is its summed log-probability over its length ** length_penalty (the length counts a stop token; > 0 favours
    longer outputs, 0 is the plain sum). Each step ranks the 2 * num_beams best candidates: those ending (a stop
    token or string) among the top num_beams are set aside as hypotheses, and the num_beams best of the rest live
    on, so endings never crowd out the live beams. Search ends at max_new_tokens, or once num_beams hypotheses have ended when early_stopping,
    or else once no live beam can still beat the worst of them.
    """
    decoder = Decoder(model, [prompt], max_new_tokens, use_cache, compile)
    beams, sums = [[]], [0.0]  # the live beams' new tokens and summed log-probabilities
    finished = []  # (score, tokens), best first, at most num_beams
    for step in range(max_new_tokens):
        logp = F.log_softmax(decoder.logits.float(), dim=-1)  # (n_live, V)
        V = logp.size(-1)
        candidates = (torch.tensor(sums, device=logp.device)[:, None] + logp).view(-1)
        top_sums, top_idx = torch.topk(candidates, min(2 * num_beams, candidates.numel()))
        rows, live, live_sums = [], [], []
        for rank, (total, index) in enumerate(zip(top_sums.tolist(), top_idx.tolist())):
            row, token = divmod(index, V)
            length = len(beams[row]) + 1
            ends = token in stop.ids or stop.in_text(beams[row] + [token])
            if ends and rank < num_beams:  # below the top num_beams an ending is not a contender (so 1 beam is greedy)
                finished.append((total / length ** length_penalty, beams[row] + ([] if token in stop.ids else [token])))
            elif not ends and len(live) < num_beams:
                rows.append(row)
                live.append(beams[row] + [token])
                live_sums.append(total)
        if step == max_new_tokens - 1:  # out of room: the live beams end here
            finished += [(total / len(seq) ** length_penalty, seq) for total, seq in zip(live_sums, live)]
        finished = sorted(finished, key=lambda h: -h[0])[:num_beams]
        if step == max_new_tokens - 1 or not live:
            break
        if len(finished) == num_beams:
            if early_stopping:
                break
            # a live beam's sum only falls from here; its best score comes at the length the penalty favours most
            best_length = max_new_tokens if length_penalty > 0 else step + 1
            if max(live_sums) / best_length ** length_penalty <= finished[-1][0]:
                break
        decoder.reorder(rows)
        decoder.append(torch.tensor([seq[-1] for seq in live], dtype=torch.long, device=decoder.tokens.device))
        beams, sums = live, live_sums
    decoder.release()
    return finished
