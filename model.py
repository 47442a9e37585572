"""
The GPT language model, GPT-2 architecture (nanochat's departures from it optional: rotary positions, QK-norm, ReLU²,
an untied output layer, grouped-query attention, RMSNorm, soft-capped logits, normalised input embeddings), in plain
PyTorch; every script shares it.

Module names follow Hugging Face / OpenAI GPT-2 (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, ln_f, lm_head), so loading GPT-2 weights is a key-for-key copy (with the Conv1D transposes).
References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Language Models are Unsupervised Multitask Learners (Radford et al., 2019)
This file knows nothing about devices, launchers or configs.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context, in tokens
    vocab_size: int = 50257  # real vocabulary; large ones are padded up to a multiple of 64 (see padded_vocab_size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2; False is a bit better and faster
    # rotary position embeddings (RoFormer, Su et al. 2021; as LLaMA and nanochat): queries and keys are rotated by
    # their positions, so attention scores depend on the distance between tokens, instead of GPT-2's learned position
    # table (wpe) added to the input. Not a GPT-2 any more: such a model cannot be exported to GPT2LMHeadModel
    rope: bool = False
    # three of nanochat's (and modded-nanogpt's) departures from GPT-2, each off by default; a model with any of them
    # cannot be exported to GPT2LMHeadModel either
    qk_norm: bool = False  # queries and keys RMS-normalised per head (after rotation): bounded attention logits
    mlp: str = "gelu"  # the MLP's nonlinearity: 'gelu' (tanh-approximated, GPT-2's) or 'relu2' (ReLU squared, Primer)
    tie_embeddings: bool = True  # the output layer is the token embedding matrix (GPT-2); False: a matrix of its own
    # and four more: grouped-query attention, parameter-free RMSNorm, soft-capped logits, normalised embeddings
    n_kv_head: int = 0  # heads of keys and values; 0: n_head (GPT-2). Fewer: each is shared by n_head/n_kv_head query
    #                     heads (GQA, Ainslie et al. 2023; 1 is multi-query attention), a KV cache that much smaller
    norm: str = "layernorm"  # 'layernorm' (GPT-2's: a learned gain, and a bias with bias=True) or 'rmsnorm' (RMSNorm with
    #                          nothing learned: nanochat's and modded-nanogpt's)
    logit_softcap: float = 0.0  # > 0: logits = c·tanh(logits/c), kept within (-c, c) (Gemma 2; nanochat's c is 15)
    embed_norm: bool = False  # the input embeddings normalised (by `norm`) before the first block, as nanochat: the
    #                           residual stream starts at unit scale whatever the embeddings' initialisation

    def __post_init__(self):
        if self.n_kv_head == self.n_head:  # GPT-2's attention, written one way only: a resume or export sees no change
            self.n_kv_head = 0

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    def departures(self):
        """{option: value} of the ARCH_OPTIONS this model sets otherwise than GPT-2 has them."""
        return {name: getattr(self, name) for name, gpt2 in GPT2_OPTIONS.items() if getattr(self, name) != gpt2}

    @property
    def padded_vocab_size(self):
        # 50257 -> 50304: matrix shapes that are multiples of 64 run markedly faster on GPUs. Small vocabularies stay
        # as they are: padding a 65-character vocabulary to 128 would double the output layer, a measured 4% slower
        # step for the baby Shakespeare model on CPU (benchmarks/cpu_step_vs_nanogpt.py)
        return (self.vocab_size + 63) // 64 * 64 if self.vocab_size >= 1024 else self.vocab_size


MLP_KINDS = ("gelu", "relu2")
NORMS = ("layernorm", "rmsnorm")
# the GPTConfig fields GPT-2 does not have, at GPT-2's values: a model with all of them so is GPT-2's. Written out, not
# taken from the defaults, which a fork may change (export would then write a model GPT-2 does not compute)
GPT2_OPTIONS = {"rope": False, "qk_norm": False, "mlp": "gelu", "tie_embeddings": True, "n_kv_head": 0,
                "norm": "layernorm", "logit_softcap": 0.0, "embed_norm": False}
ARCH_OPTIONS = tuple(GPT2_OPTIONS)


def head_problems(n_embd, n_head, rope=False, n_kv_head=0):
    """What keeps n_embd split into n_head heads (rotated in pairs, with rope; n_kv_head of keys and values) from
    being a GPT, in words: for the scripts' validate(), before any work."""
    if n_head < 1:
        return []  # reported as too small by the caller
    problems = []
    if n_kv_head < 0 or n_kv_head > n_head or n_kv_head and n_head % n_kv_head:
        problems.append(f"n_kv_head={n_kv_head} must divide n_head={n_head} (each key and value head serves as many "
                        "query heads), or be 0 for n_head")
    if n_embd % n_head:
        return problems + [f"n_embd={n_embd} is not divisible by n_head={n_head}"]
    if rope and n_embd // n_head % 2:
        problems.append(f"rope rotates pairs of dimensions: the head size n_embd/n_head={n_embd // n_head} must be "
                        "even")
    return problems


def rotary_tables(max_len, head_size, base=10000.0):
    """cos and sin (max_len, head_size/2) of RoPE's angles: position m turns its i-th pair of dimensions by
    m·base^(-2i/head_size), fast pairs for near tokens, slow ones for far (RoFormer, section 3.2)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (max_len, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate x (..., T, hs) pairwise: dimension i with i + hs/2 (the half-split pairing of GPT-NeoX and LLaMA), by
    the angles whose cos and sin (..., T, hs/2) are given."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.kv_heads == 0
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.n_embd // config.n_head
        # q for all heads, then k and v for the key/value heads (as many as q's with GPT-2)
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.n_kv_head * self.head_size, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # grouped-query attention in training: SDPA lets each key/value head serve n_head/n_kv_head query heads
        self.gqa = {"enable_gqa": True} if self.n_kv_head < self.n_head else {}
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, cache=None, layer=0, mask=None, rotary=None):
        """
        Without a cache: causal attention over x. With a KVCache (decoding), this call's keys and values are stored
        in cache layer `layer` and the queries attend to every position stored so far, as `mask` (B, 1, T, S)
        allows; mask None means every stored position is visible. rotary: RoPE's (cos, sin) for x's positions, each
        (T, hs/2) or (B, T, hs/2), or None without RoPE.
        """
        B, T, C = x.size()
        hs, kv = self.head_size, self.n_kv_head
        q, k, v = self.c_attn(x).split([C, kv * hs, kv * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, kv, hs).transpose(1, 2)  # (B, n_kv_head, T, hs)
        v = v.view(B, T, kv, hs).transpose(1, 2)  # (B, n_kv_head, T, hs)
        if rotary is not None:  # keys are cached rotated: a key's rotation depends on its own position only
            cos, sin = (t.to(q.dtype).unsqueeze(-3) for t in rotary)  # (1 or B, 1, T, hs/2): the same for each head
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.qk_norm:  # keys are cached normalised too
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if cache is None:
            # flash / memory-efficient kernels on GPU; softmax(q k^T / sqrt(hs)) v with a causal mask everywhere
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, **self.gqa)
        else:
            k, v = cache.store(layer, k, v)  # (B, n_kv_head, S, hs): every position so far, this call's last
            if kv < self.n_head:
                # the query heads that share a key/value head, side by side as one longer query of that head: plain
                # attention over the heads as stored, with no copy of them per query head, whichever kernel takes
                # the mask (a masked enable_gqa call may fall back to one that makes such copies)
                group, S = self.n_head // kv, k.size(2)
                assert mask is not None or T == 1  # a longer query's causal mask must be given
                folded = None if mask is None else \
                    mask.unsqueeze(2).expand(B, mask.size(1), group, T, S).reshape(B, mask.size(1), group * T, S)
                y = F.scaled_dot_product_attention(q.reshape(B, kv, group * T, hs), k, v, attn_mask=folded)
                y = y.view(B, self.n_head, T, hs)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.mlp in MLP_KINDS, config.mlp
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.relu2 = config.mlp == "relu2"  # relu(x)^2 instead (So et al. 2021, "Primer"; nanochat's)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        return self.dropout(self.c_proj(F.relu(x).square() if self.relu2 else self.gelu(x)))


def make_norm(config):
    """The model's normalisation layer: GPT-2's LayerNorm, or an RMSNorm with no learned gain (norm='rmsnorm')."""
    assert config.norm in NORMS, config.norm
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, mask=None, rotary=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """
    The keys and values of every layer for a batch of sequences being decoded, so each new token costs one
    position's work instead of a forward pass over the whole context. Storage for max_len positions is allocated
    on the first store (in the dtype autocast gives the keys) and filled left to right; `length` positions are
    filled in every layer.

    Rows of different lengths share one cache by left padding: row b's first pad[b] positions are padding, never
    attended to, and its real tokens take position ids 0, 1, ... from there.

    A static cache (static=True) keeps every shape fixed from one decoding step to the next, which is what CUDA
    graphs and torch.compile need to capture one step and replay it: the fill level is a tensor (`filled`) instead of
    a Python int, new keys and values are written at tensor positions (index_copy_), and attention always runs over
    all max_len positions, the ones not yet written masked out. The dynamic cache attends only to what is filled,
    which is cheaper without compilation.
    """

    def __init__(self, n_layer, max_len, pad, static=False, spare=None):
        self.n_layer, self.max_len, self.static = n_layer, max_len, static
        self.pad = pad  # (B,) left-padding positions per row
        self.padded = bool(pad.any())  # decided once: unpadded batches skip the attention mask
        self.k = self.v = None  # per layer (B, n_kv_head, max_len, hs), once allocated
        # a finished static cache whose storage this one takes over where the shapes and dtype agree, so that a step
        # captured as a CUDA graph on that storage replays as it is
        fits = static and spare is not None and spare.k is not None and spare.filled.device == pad.device
        self.spare = spare if fits else None
        self.filled = None
        if static:
            self.filled = spare.filled.zero_() if fits else torch.zeros((), dtype=torch.long, device=pad.device)
        self._length = 0

    @property
    def length(self):
        """Positions filled in every layer (a host sync for a static cache)."""
        return int(self.filled) if self.static else self._length

    def advance(self, T):
        """Count T more positions as filled, after every layer stored them."""
        if self.static:
            self.filled.add_(T)  # in place: the same tensor at every step
        else:
            self._length += T

    def store(self, layer, k, v):
        """Write k, v (B, n_kv_head, T, hs) after the filled positions; return the layer's keys and values to attend
        to."""
        if self.k is None:
            B, nh, _, hs = k.shape
            spare, self.spare = self.spare, None
            if spare and (spare.k[0].shape, spare.k[0].dtype) == ((B, nh, self.max_len, hs), k.dtype):
                self.k, self.v = spare.k, spare.v
                for t in self.k + self.v:
                    t.zero_()  # in place; masked positions are still multiplied by 0, so no NaN may stay behind
            else:
                self.k = [k.new_zeros(B, nh, self.max_len, hs) for _ in range(self.n_layer)]
                self.v = [torch.zeros_like(t) for t in self.k]
        if self.static:
            slots = self.filled + torch.arange(k.size(2), device=k.device)  # (T,)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]  # all max_len positions; the mask hides the unfilled ones
        end = self._length + k.size(2)
        assert end <= self.max_len, f"KV cache of {self.max_len} positions cannot take {end}"
        self.k[layer][:, :, self._length:end] = k
        self.v[layer][:, :, self._length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, rows):
        """Keep the rows listed in `rows` (a LongTensor), in that order, e.g. the surviving beams of a beam search."""
        self.pad = self.pad[rows]
        if self.k is None:
            return
        if self.static and len(rows) == self.k[0].size(0):
            for t in self.k + self.v:
                t.copy_(t[rows])  # in place, so the storage a captured step writes to stays the same
        else:
            self.k, self.v = [t[rows] for t in self.k], [t[rows] for t in self.v]

    def positions_and_mask(self, T):
        """
        Position ids (B, T) of the next T tokens, and the attention mask (B, 1, T, S) for them over the S positions
        store returns: a query sees the positions up to its own, minus the row's padding. Padding queries see only
        themselves, so they stay finite (an all-masked softmax row would be NaN, and NaN keys poison even the rows
        that mask them out).
        """
        device = self.pad.device
        start = self.filled if self.static else self._length
        slots = start + torch.arange(T, device=device)  # (T,)
        pos = (slots[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)
        if not self.static and not self.padded and T == 1:
            return pos, None  # one new token with no padding sees everything stored
        keys = torch.arange(self.max_len if self.static else self._length + T, device=device)  # (S,)
        causal = keys[None, :] <= slots[:, None]  # (T, S)
        real = keys[None, :] >= self.pad[:, None]  # (B, S)
        own = keys[None, :] == slots[:, None]  # (T, S)
        mask = causal[None] & (real[:, None, :] | own[None])  # (B, T, S)
        return pos, mask[:, None]


def chunk_rows(n_rows, n_cols, max_elements=2**27):
    """
    Rows per chunk: a power of two (at least 64, so matrix products see aligned shapes) such that a chunk's float32
    logits stay under max_elements (512 MB), or all n_rows when they fit at once.
    """
    if n_rows * n_cols <= max_elements:
        return n_rows
    return max(64, 2 ** int(math.log2(max_elements // n_cols)))


def softcap(logits, cap):
    """cap·tanh(logits/cap) in float32 (Gemma 2's logit soft-capping): logits as they are up to a few units, then
    bent towards ±cap, never past it. cap 0: the logits unchanged."""
    return torch.tanh(logits.float() / cap) * cap if cap else logits


def cap_budget(cap):
    """chunk_rows' budget of float32 logits per chunk: half with a soft-cap, whose chunk holds twice the arrays (the
    tanh and the slope besides the logits and their log-softmax)."""
    return 2**26 if cap else 2**27


def chunk_log_softmax(x, w, pad_mask, cap=0.0):
    """
    One chunk's log-probabilities (R, Vp) in float32: log_softmax(softcap(x (R, C) @ w (Vp, C).T) + pad_mask (Vp,)),
    the mask -inf on padding ids, so they have probability 0 while every product keeps the padded, aligned width.
    Returns them with the soft-cap's slope d capped / d logits (R, Vp), None without one.
    """
    if not cap:
        logits = torch.addmm(pad_mask, x, w.t())  # (R, Vp) in the compute dtype
        return logits.log_softmax(dim=-1, dtype=torch.float32), None
    tanh = torch.tanh((x @ w.t()).float() / cap)  # (R, Vp)
    logits = torch.add(pad_mask.float(), tanh, alpha=cap)  # the mask after the cap: -inf stays -inf
    return logits.log_softmax(dim=-1), 1 - tanh.square_()


def chunked_nll(x, weight, targets, pad_mask, cap=0.0):
    """
    Cross-entropy of each row: -log softmax(softcap(x @ weight.T) + pad_mask)[target], in float32, 0 where the
    target is -1. x (N, C), weight (Vp, C) and pad_mask (Vp,) in the compute dtype; the logits exist a chunk of rows
    at a time.
    """
    out = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    rows = chunk_rows(x.size(0), weight.size(0), cap_budget(cap))
    for i in range(0, x.size(0), rows):
        logp, t = chunk_log_softmax(x[i:i + rows], weight, pad_mask, cap)[0], targets[i:i + rows]
        out[i:i + rows] = -logp.gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t >= 0)
    return out


class LinearCrossEntropy(torch.autograd.Function):
    """
    loss = mean cross-entropy of logits = x @ weight.T (the tied output layer, padding ids masked out), computed like
    nanoGPT's F.cross_entropy(logits.float()) but never holding the (N, Vp) logits: each chunk of rows computes its
    logits (compute dtype), their log-softmax in float32, the loss, and at once the gradient
    d loss / d logits = (softmax - onehot) / n (times the soft-cap's slope, with one), which two matrix products turn
    into the gradients of x and weight.
    Backward only scales those by the incoming gradient. Same matrix products as the unfused layer and loss (logits,
    then dx and dW), all at the padded vocabulary width and on chunks of a power-of-two number of rows, so every
    operand is aligned; the float32 logits and their gradient (GPT-2 small at batch 32: 6.6 GB each) never exist
    whole, and the loss's elementwise work touches each chunk while it is fresh.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, pad_mask, cap=0.0):
        # x (N, C), pad_mask (Vp,): the compute dtype; weight (Vp, C): the float32 parameter; targets (N,): -1 for none;
        # cap: the logits' soft-cap, 0 for none
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(x.dtype)
            n = (targets >= 0).sum()
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            # the gradients are kept in float32 and divided by n there: (softmax - onehot) / n would underflow in
            # float16 for large n, where the unfused path relies on GradScaler's scaled loss
            grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
            rows = chunk_rows(x.size(0), w.size(0), cap_budget(cap))
            for i in range(0, x.size(0), rows):
                xc, t = x[i:i + rows], targets[i:i + rows]
                valid = (t >= 0)[:, None]
                logp, slope = chunk_log_softmax(xc, w, pad_mask, cap)  # (R, Vp)
                loss = loss - (logp.gather(1, t.clamp(min=0)[:, None]) * valid).sum()
                grad = logp.exp_()  # softmax, in place of the log-probabilities, which are done with
                grad.scatter_add_(1, t.clamp(min=0)[:, None], -valid.float())
                if slope is not None:  # through the cap, back to the products' logits
                    grad.mul_(slope)
                grad = (grad * valid).to(x.dtype)  # n * d loss / d logits, 0 in the padding columns
                grad_x[i:i + rows] = (grad @ w).float() / n
                grad_w += (grad.t() @ xc).float()
            grad_w /= n
        ctx.save_for_backward(grad_x, grad_w)
        ctx.x_dtype = x.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_loss).to(ctx.x_dtype), grad_w * grad_loss, None, None, None


class GPT(nn.Module):
    # the output layer and loss as one chunked computation (LinearCrossEntropy, chunked_nll): no (B, T, V) logits.
    # train.py and bench.py set it from their fused_loss key (off by default: it saves memory but is slower to train
    # on an H100); scoring without gradients (evaluate.py) keeps it on, where it only saves memory
    fused_loss = True
    # activation checkpointing: in training, each block's activations are recomputed in the backward pass instead of
    # kept from the forward one (torch.utils.checkpoint, random state restored so dropout masks match): a block's
    # input is all it keeps, for about a third more compute. train.py and bench.py set it from their `recompute` key
    recompute = False

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            **({} if config.rope else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            **(dict(ln_e=make_norm(config)) if config.embed_norm else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.rope:  # computed, not learned: buffers outside the state dict, so checkpoints hold weights only
            problems = head_problems(config.n_embd, config.n_head, rope=True)
            assert not problems, problems[0]
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying (Press & Wolf 2017, as GPT-2): one matrix reads and writes tokens
            self.transformer.wte.weight = self.lm_head.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """
        GPT-2's initialisation, every parameter:
        - Linear weights and both embeddings: normal(0, 0.02); wte doubles as lm_head through tying (untied, each is
          drawn so). With rope there is no position table (RoPE's angles are fixed buffers).
        - The two projections that write into the residual stream (attn.c_proj, mlp.c_proj): normal(0, 0.02/sqrt(2·n_layer)),
          so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        - Linear biases: zero. LayerNorm: weight one, bias zero.
        """
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std_resid if name.endswith("c_proj") else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        """Parameter count; by default without the tables that are only looked up: the position embedding, and the
        token embedding where it is not lm_head too (tie_embeddings=False). The rest take part in matrix products."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rope:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n_params -= self.transformer.wte.weight.numel()
        return n_params

    def forward(self, idx, targets=None, cache=None, reduction="mean", all_logits=False):
        """
        idx: (B, T) token ids. Returns (logits, loss). With targets (B, T) the loss is the mean cross-entropy over
        the real vocabulary (padding ids excluded) and the targets that are not -1, or with reduction='none' each
        position's (B, T), 0 where the target is -1; logits are then None (fused_loss, the default; else every
        position's). Without targets the logits are the last position's (B, 1, V), all generation needs, or with
        all_logits every position's (B, T, V). Logits are over the real vocabulary only, so padding ids can never be
        sampled.
        With a KVCache (see new_cache), idx continues the sequences stored there: positions and the attention mask
        come from the cache, and idx's keys and values are added to it.
        """
        B, T = idx.size()
        if cache is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens exceeds block_size {self.config.block_size}"
            pos, mask = torch.arange(0, T, dtype=torch.long, device=idx.device), None  # (T,)
        else:
            # positions stay below block_size because the cache holds at most block_size (see new_cache)
            pos, mask = cache.positions_and_mask(T)  # (B, T), (B, 1, T, S) or None
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.rope:
            rotary = self.rope_cos[pos], self.rope_sin[pos]  # (T, hs/2) or (B, T, hs/2), for every layer
        else:
            rotary, x = None, x + self.transformer.wpe(pos)
        if self.config.embed_norm:
            x = self.transformer.ln_e(x)
        x = self.transformer.drop(x)
        recompute = self.recompute and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, None, i, None, rotary, use_reentrant=False)
            else:
                x = block(x, cache, i, mask, rotary)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        if targets is not None:
            return self.output_loss(x, targets, reduction)
        logits = self.lm_head(x if all_logits else x[:, [-1], :])[..., :self.config.vocab_size]  # (B, T or 1, V)
        return softcap(logits, self.config.logit_softcap), None

    def output_loss(self, x, targets, reduction="mean"):
        """
        The output layer and the cross-entropy over the real vocabulary (padding ids get -inf: probability 0,
        gradient 0, on rows of aligned width, which is faster than cutting them to V columns): x (B, T, C) from ln_f,
        targets (B, T), -1 for none. Returns (logits, loss) as forward does; logits None with fused_loss.
        """
        B, T, _ = x.size()
        cap = self.config.logit_softcap
        if self.fused_loss:
            # the output layer and the loss together, a chunk of rows at a time: no (B, T, Vp) logits
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            x, targets = x.to(dtype).reshape(B * T, -1), targets.reshape(-1)
            mask = self.padding_mask(dtype, x.device)
            if reduction == "none":
                return None, chunked_nll(x, self.lm_head.weight.to(dtype), targets, mask, cap).view(B, T)
            if torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad):
                return None, LinearCrossEntropy.apply(x, self.lm_head.weight, targets, mask, cap)
            n = (targets >= 0).sum()
            return None, chunked_nll(x, self.lm_head.weight.to(dtype), targets, mask, cap).sum() / n
        logits = softcap(self.lm_head(x), cap)  # (B, T, Vp)
        if logits.size(-1) > self.config.vocab_size:
            logits = logits + self.padding_mask(logits.dtype, logits.device)
        loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return logits[..., :self.config.vocab_size], loss.view(B, T) if reduction == "none" else loss

    def padding_mask(self, dtype, device):
        """(Vp,) 0 for the real vocabulary, -inf for the padding ids."""
        mask = torch.zeros(self.config.padded_vocab_size, dtype=dtype, device=device)
        mask[self.config.vocab_size:] = float("-inf")
        return mask

    def new_cache(self, max_len, pad, static=False, spare=None):
        """
        An empty KVCache for len(pad) rows of up to max_len (<= block_size) positions, pad[b] of them left padding;
        static for decoding under torch.compile / CUDA graphs, on a spare static cache's storage if given (see
        KVCache).
        """
        assert max_len <= self.config.block_size
        return KVCache(self.config.n_layer, max_len, pad, static, spare)

    def set_block_size(self, block_size):
        """Change the longest context: crop the learned position table (e.g. to fine-tune GPT-2's 1024 at 256; it
        cannot grow, those positions were never trained), or with rope compute the angles for any length, longer ones
        included (RoPE has nothing learned per position; the model still has to learn to use a longer context)."""
        assert self.config.rope or block_size <= self.config.block_size, "a learned position table cannot grow"
        self.config.block_size = block_size
        if self.config.rope:
            cos, sin = rotary_tables(block_size, self.config.n_embd // self.config.n_head)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, make=None, muon=False):
        """
        AdamW with weight decay on matrices and embeddings (>= 2-D) only, never on biases and LayerNorm gains.
        muon: the blocks' weight matrices go to Muon instead (torch.optim.Muon, as in modded-nanogpt and nanochat),
        stepped together with AdamW for the rest (Optimizers). Its updates are scaled to AdamW's RMS (Moonshot's
        match_rms_adamw), so the same learning rate and weight decay carry over. Muon orthogonalises each matrix
        whole, q, k and v together in c_attn.
        make(optimizer_class, groups, **settings) builds each optimizer: the class itself by default, or a wrapper
        (train.py's shard_optimizer passes ZeroRedundancyOptimizer).
        """
        make = make or (lambda optimizer_class, groups, **settings: optimizer_class(groups, **settings))
        params = [p for p in self.parameters() if p.requires_grad]
        matrices = {id(p) for p in self.transformer.h.parameters() if p.dim() == 2} if muon else set()
        decay = [p for p in params if p.dim() >= 2 and id(p) not in matrices]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel updates every tensor in one pass: on a laptop CPU it cuts the optimizer step ~5x against
        # the per-tensor loop PyTorch uses there by default; fall back where a device has no fused AdamW
        try:
            adamw = make(torch.optim.AdamW, groups, lr=learning_rate, betas=betas, fused=True)
        except (RuntimeError, TypeError):
            adamw = make(torch.optim.AdamW, groups, lr=learning_rate, betas=betas)
        if not muon:
            return adamw
        muon_groups = [{"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay}]
        return Optimizers(adamw=adamw, muon=make(torch.optim.Muon, muon_groups, lr=learning_rate,
                                                 adjust_lr_fn="match_rms_adamw"))

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6N for the matmuls with weights plus 12·L·H·Q·T for attention
        (PaLM paper, appendix B), N without the position table."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak (None when the peak is unknown)."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides):
        """GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face folder; overrides: dropout,
        block_size (crops the context). The format lives in hf.py, imported only when this is used."""
        from hf import load_hf_gpt2
        return load_hf_gpt2(name_or_path, **overrides)


class Optimizers:
    """
    Several optimizers stepped as one, by name (configure_optimizers' Muon with AdamW): what train.py and
    torch.amp.GradScaler use of an optimizer. param_groups lists every group, each optimizer's in turn; the state
    dict holds each one's under its name.
    """

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def consolidate_state_dict(self, to=0):  # each one sharded by ZeroRedundancyOptimizer
        for optimizer in self.optimizers.values():
            optimizer.consolidate_state_dict(to=to)

    def state_dict(self):
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise ValueError(f"an optimizer state for {sorted(state)}, not {sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


# Dense bf16 tensor-core peak FLOP/s by GPU, from the vendors' data sheets (no sparsity). Matched against
# torch.cuda.get_device_name(); the first matching substring wins, so more specific names come first.
PEAK_FLOPS_BF16 = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM, and GH200's
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
]


def peak_flops_for(device_name):
    """Peak bf16 FLOP/s of a GPU by its name, or None when it is not in the table (give train.py --peak_flops)."""
    for key, flops in PEAK_FLOPS_BF16:
        if key in device_name:
            return flops
    return None
