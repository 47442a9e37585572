"""Decoding on the KV cache (generate.py, model.KVCache) against naive references, on tiny models in float32."""

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

import generate as generate_module
from generate import Stop, beam_search, generate, next_token, top_k_filter, top_p_filter
from model import GPT, GPTConfig


# GPT-2's architecture, with rotary positions, with nanochat's departures from it as well (multi-query attention of
# its grouped-query kind: one key/value head for both query heads), and grouped-query attention proper, where which
# query head reads which key/value head matters: 2 key/value heads for 4 query heads
ARCHS = {"gpt2": {}, "rope": {"rope": True},
         "nanochat": {"rope": True, "qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "n_kv_head": 1,
                      "norm": "rmsnorm", "logit_softcap": 15.0, "embed_norm": True},
         "gqa": {"n_head": 4, "n_kv_head": 2}}


def tiny(vocab_size=50, block_size=16, seed=0, sharp=False, **arch):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": block_size,
                             "vocab_size": vocab_size, **arch})).eval()
    if sharp:  # a separate, larger output layer: peaked distributions that do not just repeat the last token
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape) * 0.5)
    return model


def naive_greedy(model, prompt, n):
    """nanoGPT's loop: the whole (cropped) context through the plain forward for every new token."""
    idx = torch.tensor([prompt])
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt):].tolist()


def log_prob(model, prompt, tokens):
    """Summed log-probability of `tokens` after `prompt`, from one full forward pass."""
    idx = torch.tensor([prompt + tokens])
    logits, _ = model(idx[:, :-1], all_logits=True)
    logp = F.log_softmax(logits[0, len(prompt) - 1:], dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None]).sum().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("static", [False, True])
def test_cached_logits_match_full_forward(static, arch):
    model = tiny(**ARCHS[arch])
    idx = torch.randint(0, 50, (3, 12))
    full, _ = model(idx, all_logits=True)  # (3, 12, V): every position
    cache = model.new_cache(16, torch.zeros(3, dtype=torch.long), static=static)  # 4 positions never filled
    model(idx[:, :5], cache=cache)  # prefill five, then one position at a time
    for t in range(5, 12):
        step, _ = model(idx[:, t:t + 1], cache=cache)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5)
    assert cache.length == 12
    if static:  # every step attended over all 16 positions, and wrote in place
        assert cache.k[0].shape[2] == 16 and not cache.k[0][:, :, 12:].any()


@pytest.fixture
def compile_count(monkeypatch):
    """generate's compiled step through a backend that runs the captured graph as is and counts compilations."""
    calls = {"graphs": 0}

    def counting_backend(graph_module, example_inputs):
        calls["graphs"] += 1
        return graph_module.forward

    real_compile = torch.compile

    def counting_compile(fn, mode=None, **settings):  # compiled_step's own settings, a backend that only counts
        return real_compile(fn, backend=counting_backend, **settings)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)  # torch's 8, reached with fewer shapes
    generate_module.compiled_step.cache_clear()
    yield calls
    generate_module.compiled_step.cache_clear()
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["gpt2", "nanochat", "gqa"])  # nanochat's includes rope
def test_compiled_decoding_matches_eager_and_compiles_once_per_shape(compile_count, arch):
    """
    compile=True (static cache, one-token steps through torch.compile with fullgraph: no graph breaks) generates what
    the dynamic cache does, for padded batches, sampling, beam search and past block_size; each batch shape and cache
    length compiles once, however many steps and calls, and more shapes than torch's recompile limit still decode. A
    call takes over the storage of the last call's static cache where its shape fits (so a CUDA graph recorded on it
    replays instead of recording again), cleared.
    """
    model = tiny(block_size=64, sharp=True, **ARCHS[arch])
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]  # left padding in the static cache
    eager = generate(model, prompts, 30, temperature=0)
    assert generate(model, prompts, 30, temperature=0, compile=True) == eager
    assert compile_count["graphs"] == 1  # 29 one-token steps, one graph
    spare = generate_module.SPARE_CACHES[model]  # its storage, which the next call of this shape takes over
    storage = [t.data_ptr() for t in spare.k + spare.v + [spare.filled]]
    for t in spare.k + spare.v:
        t.fill_(float("nan"))  # what a run that overflowed would leave: cleared, not attended to through the mask
    assert generate(model, prompts, 30, temperature=0, compile=True) == eager  # a new cache: same graph
    assert compile_count["graphs"] == 1
    spare = generate_module.SPARE_CACHES[model]
    assert [t.data_ptr() for t in spare.k + spare.v + [spare.filled]] == storage  # a CUDA graph's would replay

    draw = dict(temperature=1.0, top_k=10, top_p=0.9)
    sampled = generate(model, prompts, 30, generator=torch.Generator().manual_seed(3), **draw)
    assert generate(model, prompts, 30, generator=torch.Generator().manual_seed(3), compile=True, **draw) == sampled

    eager_beams = beam_search(model, [3, 4, 5], 12, num_beams=4, early_stopping=False)
    compiled_beams = beam_search(model, [3, 4, 5], 12, num_beams=4, early_stopping=False, compile=True)
    assert [t for _, t in compiled_beams] == [t for _, t in eager_beams]
    assert [s for s, _ in compiled_beams] == pytest.approx([s for s, _ in eager_beams], abs=1e-4)

    long_prompt = [i % 50 for i in range(60)]  # 60 of 64 positions: the context slides after 4 new tokens
    assert generate(model, [long_prompt], 20, temperature=0, compile=True) == [naive_greedy(model, long_prompt, 20)]

    # a one-token prompt (sample.py's unconditional start, end-of-text alone) is prefilled eagerly like any other:
    # through the compiled step it would allocate the cache inside the captured graph and compile a second one
    graphs, starts = compile_count["graphs"], [[7], [8], [9]]  # a batch size not decoded before: one new graph
    assert generate(model, starts, 20, temperature=0, compile=True) == [naive_greedy(model, p, 20) for p in starts]
    assert compile_count["graphs"] == graphs + 1


def test_greedy_with_cache_equals_recomputation_over_block_boundary():
    model = tiny(block_size=16)
    for prompt in ([7], list(range(20))):  # the second is longer than block_size
        expected = naive_greedy(model, prompt, 24)  # the context slides past 16
        assert generate(model, [prompt], 24, temperature=0) == [expected]
        assert generate(model, [prompt], 24, temperature=0, use_cache=False) == [expected]


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_different_lengths_equals_each_prompt_alone(arch):
    """Left padding: each row's positions (the learned table's, or RoPE's rotations) start at its first token."""
    model = tiny(block_size=16, **ARCHS[arch])
    prompts = [[3], [4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # left padding of 7, 0 and 5 positions
    together = generate(model, prompts, 30, temperature=0)
    assert together == [naive_greedy(model, p, 30) for p in prompts]
    assert generate(model, prompts, 30, temperature=0, use_cache=False) == together


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(next_token(logits, temperature=0), logits.argmax(-1))
    # top_k=1 sampling has one candidate left: the argmax again, whatever the draw
    assert torch.equal(next_token(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_low_temperature_in_float16_is_nearly_greedy():
    """float16 logits (fp16 autocast) at a low temperature: no overflow to inf and NaN probabilities, the argmax
    almost surely; and at a moderate one, the draws of the same logits in float32, not of float16-rounded ones."""
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 30  # GPT-2-sized logits, up to ~100
    half = logits.half()
    for temperature in (1e-3, 1e-5, 1e-30):
        assert torch.equal(next_token(half, temperature=temperature), half.argmax(-1))
    for temperature in (0.1, 0.3, 1.0):  # the same draws as from the same values in float32
        for seed in range(50):
            assert torch.equal(next_token(half, temperature, generator=torch.Generator().manual_seed(seed)),
                               next_token(half.float(), temperature, generator=torch.Generator().manual_seed(seed)))


def test_top_k_keeps_exactly_k_with_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
    for k, kept_ids in [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (5, [1, 2, 3, 4, 6]), (7, list(range(7)))]:
        out = top_k_filter(logits, k)
        kept = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert kept == kept_ids, k  # exactly k; ties at the k-th place go to the lowest ids
        assert torch.equal(out[0, kept], logits[0, kept])
    many = torch.zeros(3, 100)  # all tied
    assert (torch.isfinite(top_k_filter(many, 10)).sum(-1) == 10).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # ranked: 0.5, 0.3, 0.15, 0.05
    for p, kept_ids in [(0.3, [1]), (0.6, [1, 3]), (0.79, [1, 3]), (0.9, [0, 1, 3]), (0.99, [0, 1, 2, 3])]:
        kept = torch.isfinite(top_p_filter(logits, p)[0]).nonzero().flatten().tolist()
        assert kept == kept_ids, p
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # against the definition, on random distributions
        logits = torch.randn(1, 30, generator=generator) * 2
        p = torch.rand(1, generator=generator).item()
        probs = F.softmax(logits.double(), -1)[0].sort(descending=True).values
        cum = probs.cumsum(0)
        if (cum - p).abs().min() < 1e-5:
            continue  # too close to call in float32
        smallest = int((cum < p).sum()) + 1
        assert torch.isfinite(top_p_filter(logits, p)).sum().item() == smallest


def test_sampling_is_reproducible_and_stays_in_top_k():
    model = tiny()
    draw = lambda seed: generate(model, [[1, 2]] * 3, 25, temperature=1.5, top_k=3,
                                 generator=torch.Generator().manual_seed(seed))
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    # every draw is among the 3 most likely tokens given its context
    for row in draw(7):
        context = [1, 2]
        for token in row:
            logits, _ = model(torch.tensor([context[-16:]]))
            assert token in logits[0, -1].topk(3).indices.tolist()
            context.append(token)


def test_stop_tokens_and_strings():
    stop = Stop(strings=["\n\n", "END"], decode=str)
    assert stop.cut("one\ntwo\n\nthree") == "one\ntwo"
    assert stop.cut("a END b\n\n") == "a "
    assert stop.cut("nothing here") == "nothing here"

    model = tiny()
    free = generate(model, [[1]], 20, temperature=0)[0]
    token = free[5]
    cut = generate(model, [[1]], 20, temperature=0, stop=Stop(ids=[token]))[0]
    assert cut == free[:free.index(token)]  # ends at the first stop token, which is not kept

    decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)
    text = decode(free)
    target = text[6:8]  # a two-character stop string
    ended = generate(model, [[1]], 20, temperature=0, stop=Stop(strings=[target], decode=decode))[0]
    assert decode(ended).endswith(target) and target not in decode(ended[:-1])
    assert Stop(strings=[target], decode=decode).cut(decode(ended)) == text[:text.index(target)]


def test_beam_search_with_one_beam_is_greedy():
    model = tiny(sharp=True)
    (score, tokens), = beam_search(model, [1, 2], 12, num_beams=1)
    assert tokens == naive_greedy(model, [1, 2], 12)
    assert score == pytest.approx(log_prob(model, [1, 2], tokens) / 12, abs=1e-4)
    absent = min(set(range(model.config.vocab_size)) - set(tokens))
    for eos in sorted(set(tokens[1:])) + [absent]:  # an end-of-text token ends it where greedy would, only there
        ended = tokens[:tokens.index(eos)] if eos in tokens else tokens
        assert beam_search(model, [1, 2], 12, num_beams=1, stop=Stop(ids=[eos]))[0][1] == ended


def exhaustive(model, prompt, max_len, eos, length_penalty):
    """The best continuation by brute force: every sequence ending at eos or at max_len tokens."""
    V = model.config.vocab_size
    best = (-math.inf, None)
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(V), repeat=n):
            seq = list(seq)
            if eos in seq[:-1] or (n < max_len and seq[-1] != eos):
                continue  # not a complete hypothesis
            score = log_prob(model, prompt, seq) / n ** length_penalty
            best = max(best, (score, seq[:-1] if seq[-1] == eos else seq))
    return best


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5])
def test_beam_search_finds_the_exhaustive_best(length_penalty):
    """With num_beams = V^(L-1) beams every prefix fits, so the search must find the global best."""
    model, V, L, eos = tiny(vocab_size=3, sharp=True, seed=10), 3, 4, 0
    best_score, best_tokens = exhaustive(model, [1, 2], L, eos, length_penalty)
    hypotheses = beam_search(model, [1, 2], L, num_beams=V ** (L - 1), length_penalty=length_penalty,
                             early_stopping=False, stop=Stop(ids=[eos]))
    score, tokens = hypotheses[0]
    assert tokens == best_tokens
    assert score == pytest.approx(best_score, abs=1e-4)
    if length_penalty <= 0:  # on this model the search matters: one beam (greedy) misses the best
        assert beam_search(model, [1, 2], L, num_beams=1, length_penalty=length_penalty,
                           stop=Stop(ids=[eos]))[0][1] != best_tokens


def test_beam_search_scores_are_honest_and_sorted():
    model = tiny(vocab_size=20, sharp=True, seed=2)
    hypotheses = beam_search(model, [3, 4, 5], 8, num_beams=4, length_penalty=1.0)
    assert len(hypotheses) == 4
    scores = [s for s, _ in hypotheses]
    assert scores == sorted(scores, reverse=True)
    for score, tokens in hypotheses:
        assert score == pytest.approx(log_prob(model, [3, 4, 5], tokens) / len(tokens), abs=1e-4)
    greedy = naive_greedy(model, [3, 4, 5], 8)
    assert hypotheses[0][0] >= log_prob(model, [3, 4, 5], greedy) / 8 - 1e-5  # never worse than greedy
    # the cache changes nothing but speed
    assert beam_search(model, [3, 4, 5], 8, num_beams=4, use_cache=False)[0][1] == hypotheses[0][1]
