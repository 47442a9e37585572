import math

import pytest
import torch

from generate import generate
from model import GPT, GPTConfig, apply_rotary, peak_flops_for, rotary_tables


def tiny(**overrides):
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)
    args.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def test_shapes_and_padding():
    model = tiny(vocab_size=1100)
    assert model.config.padded_vocab_size == 1152
    assert model.lm_head.weight.shape == (1152, 32)
    idx = torch.randint(0, 1100, (3, 16))
    logits, loss = model(idx, idx)
    assert logits is None and loss.ndim == 0  # the fused output layer and loss never make the logits
    assert model(idx, idx, reduction="none")[1].shape == (3, 16)
    assert model(idx, all_logits=True)[0].shape == (3, 16, 1100)  # the real vocabulary: padding ids cannot be sampled
    model.fused_loss = False
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 1100) and loss.ndim == 0
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 1100) and loss is None
    assert tiny(vocab_size=65).lm_head.weight.shape == (65, 32)  # small vocabularies are not padded
    assert GPTConfig(vocab_size=50257).padded_vocab_size == 50304


# nanochat's departures from GPT-2 (n_kv_head=1 of tiny's 2 heads: multi-query attention)
NANOCHAT = dict(rope=True, qk_norm=True, mlp="relu2", tie_embeddings=False, n_kv_head=1, norm="rmsnorm",
                logit_softcap=15.0, embed_norm=True)


@pytest.mark.parametrize("arch", [{}, {"rope": True}, NANOCHAT])
def test_causality(arch):
    """Changing token t never changes the logits at positions before t."""
    model = tiny(**arch).eval()
    idx = torch.randint(0, 50, (2, 16))
    logits, _ = model(idx, all_logits=True)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        new_logits, _ = model(changed, all_logits=True)
        assert torch.allclose(logits[:, :t], new_logits[:, :t], atol=1e-6)
        assert not torch.allclose(logits[:, t], new_logits[:, t])


def test_initial_loss_is_uniform():
    for vocab in (65, 1000):
        model = tiny(vocab_size=vocab, n_layer=4).eval()
        idx = torch.randint(0, vocab, (8, 16))
        _, loss = model(idx, torch.randint(0, vocab, (8, 16)))
        assert abs(loss.item() - math.log(vocab)) < 0.1, (vocab, loss.item())


def test_weight_tying():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    n_unique = sum(p.numel() for p in model.parameters())  # parameters() yields the shared tensor once
    assert model.get_num_params(non_embedding=False) == n_unique


def test_residual_projection_init():
    model = tiny(n_layer=8, n_embd=256, n_head=4)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_overfit_one_batch():
    model = tiny()
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95))
    idx = torch.randint(0, 50, (4, 16))
    for _ in range(300):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_optimizer_decays_only_matrices():
    model = tiny()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    """optimizer=muon: each parameter in exactly one group; Muon has the blocks' weight matrices, AdamW the (tied)
    embeddings with decay and the gains and biases without; both step, and the pair's state dict loads back."""
    model = tiny()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), muon=True)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = [names[id(p)] for group in opt.optimizers["muon"].param_groups for p in group["params"]]
    decay, no_decay = ([names[id(p)] for p in group["params"]] for group in opt.optimizers["adamw"].param_groups)
    assert sorted(muon + decay + no_decay) == sorted(names.values())
    assert sorted(muon) == sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.")
                                  and p.dim() == 2) and len(muon) == 4 * model.config.n_layer
    assert sorted(decay) == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert all(model.get_parameter(n).dim() == 1 for n in no_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]
    idx = torch.randint(0, 50, (4, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # every parameter moved
    state = opt.state_dict()
    again = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), muon=True)
    again.load_state_dict(state)
    assert torch.equal(again.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"],
                       state["muon"]["state"][0]["momentum_buffer"])
    with pytest.raises(ValueError, match="an optimizer state for"):
        again.load_state_dict(state["adamw"])  # a plain AdamW checkpoint's


def test_rotary_is_roformers_rotation_by_position():
    """apply_rotary on rotary_tables' angles is RoFormer's rotation written with complex numbers: pair j of a head
    (dimensions j and j + hs/2) as x_j + i·x_(j+hs/2), times e^(i·m·θ_j) at position m, θ_j = 10000^(-2j/hs). So
    a query at position m and a key at n score as a function of m - n alone."""
    hs, T = 8, 12
    cos, sin = rotary_tables(T, hs)
    x = torch.randn(3, T, hs, dtype=torch.float64)
    theta = 10000.0 ** (-2 * torch.arange(hs // 2, dtype=torch.float64) / hs)
    turn = torch.polar(torch.ones(T, hs // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)  # (T, hs/2)
    z = torch.complex(x[..., :hs // 2], x[..., hs // 2:]) * turn
    assert torch.allclose(apply_rotary(x.float(), cos, sin), torch.cat([z.real, z.imag], -1).float(), atol=1e-6)

    q, k = torch.randn(hs), torch.randn(hs)

    def score(m, n):
        return (apply_rotary(q, cos[m], sin[m]) @ apply_rotary(k, cos[n], sin[n])).item()
    assert score(5, 2) == pytest.approx(score(11, 8), abs=1e-5) and score(4, 4) == pytest.approx((q @ k).item())
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_model_has_no_position_table():
    """rope=True: no learned position table and nothing new in the state dict (RoPE's angles are computed buffers),
    so a checkpoint holds weights only and loads into a fresh model; every parameter counts as non-embedding; a
    shorter or longer context gives the first model's logits for the positions they share."""
    model = tiny(rope=True).eval()
    assert set(model.state_dict()) == set(tiny().state_dict()) - {"transformer.wpe.weight"}
    assert model.get_num_params() == model.get_num_params(non_embedding=False)
    again = tiny(rope=True, vocab_size=50)
    again.load_state_dict(model.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    full, _ = model(idx, all_logits=True)
    assert torch.equal(again.eval()(idx, all_logits=True)[0], full)
    model.set_block_size(8)
    assert torch.allclose(model(idx[:, :8], all_logits=True)[0], full[:, :8], atol=1e-6)
    assert model.rope_cos.shape == (8, 8)
    model.set_block_size(32)  # longer than it was built for: nothing learned per position, the angles are computed
    longer = torch.randint(0, 50, (2, 32))
    longer[:, :16] = idx
    assert torch.allclose(model(longer, all_logits=True)[0][:, :16], full, atol=1e-6)
    with pytest.raises(AssertionError, match="cannot grow"):
        tiny().set_block_size(32)
    with pytest.raises(AssertionError, match="must be even"):
        tiny(rope=True, n_embd=30, n_head=2)  # head size 15


def test_no_bias():
    names = [name for name, _ in tiny(bias=False).named_parameters()]
    assert names and not any(name.endswith("bias") for name in names)
    assert any(name.endswith("bias") for name, _ in tiny(bias=True).named_parameters())


def test_padding_ids_never_generated():
    model = tiny(vocab_size=1100).eval()
    with torch.no_grad():  # make the padding rows of the output layer overwhelmingly likely
        model.lm_head.weight[1100:] = 100.0
    out = generate(model, [[0], [0]], 20, temperature=1.0)
    assert max(max(row) for row in out) < 1100


def test_mfu_uses_the_given_peak():
    model = tiny()
    assert model.estimate_mfu(1000.0, None) is None
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000.0 / 1e12)
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200 NVL") == 835e12 and peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA GH200 480GB") == 989e12 and peak_flops_for("NVIDIA H800 PCIe") == 756e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Some Unknown GPU") is None


def test_chunk_rows_are_aligned_and_bounded():
    """Chunks of the fused loss: a power of two of at least 64 rows (aligned matrix products) whose float32 logits
    fit the budget, or every row at once when they all fit."""
    from model import chunk_rows
    assert chunk_rows(32 * 1024, 50304) == 2048  # GPT-2 small at batch 32: 16 chunks of 412 MB
    assert chunk_rows(100, 128) == 100
    for n_rows, n_cols in [(5000, 50304), (10**7, 128), (70000, 2**21)]:
        rows = chunk_rows(n_rows, n_cols)
        assert rows >= 64 and rows & (rows - 1) == 0
        assert rows * n_cols <= 2**27 or rows == 64


@pytest.mark.parametrize("vocab_size, cap", [(65, 0.0), (1100, 0.0), (1100, 0.2)])
def test_fused_loss_matches_logits_then_cross_entropy(vocab_size, cap, monkeypatch):
    """LinearCrossEntropy (chunked, gradients made in the forward pass) gives the loss and every gradient of the
    plain output layer + F.cross_entropy, ignored targets included, over several chunks; also through a logit
    soft-cap tight enough to bend most of these logits (autograd's tanh derivative against the fused pass's)."""
    import model as model_module
    monkeypatch.setattr(model_module, "chunk_rows", lambda *shape: 7)  # 48 rows: 7 chunks, a ragged last one
    fused, plain = tiny(vocab_size=vocab_size, logit_softcap=cap), tiny(vocab_size=vocab_size, logit_softcap=cap)
    plain.fused_loss = False
    idx = torch.randint(0, vocab_size, (3, 16))
    targets = torch.randint(0, vocab_size, (3, 16))
    targets[0, :5] = -1
    losses = []
    for model in (fused, plain):
        _, loss = model(idx, targets)
        (2.0 * loss).backward()  # the incoming gradient is not always 1 (gradient accumulation, GradScaler)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-4), name
    with torch.no_grad():
        per_token = fused(idx, targets, reduction="none")[1]
        assert torch.allclose(per_token, plain(idx, targets, reduction="none")[1], atol=1e-5)
        assert (per_token[0, :5] == 0).all()
        assert fused(idx, targets)[1].item() == pytest.approx(losses[1], rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(idx, targets)[1].item() == pytest.approx(plain(idx, targets)[1].item(), rel=1e-3)


@pytest.mark.parametrize("arch", [{}, {"rope": True}, NANOCHAT])
def test_recompute_gives_the_same_gradients_and_keeps_less(arch):
    """recompute=True (activation checkpointing): the same loss and gradients, bit for bit, dropout included (its
    random state is restored for the recomputation), and the forward pass keeps a fraction of what it keeps without
    (the bytes autograd saves for the backward pass)."""
    config = GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=100, dropout=0.1, **arch)
    idx = torch.randint(0, 100, (4, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        model.recompute = recompute
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[recompute] = loss.item(), grads, sum(saved)
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][n], results[False][1][n]) for n in results[False][1])
    assert results[True][2] < results[False][2] / 3, (results[True][2], results[False][2])


def test_nanochat_departures():
    """qk_norm, mlp='relu2' and tie_embeddings=False, each what it says: queries and keys normalised (so their scale
    no longer matters), relu(x)^2, and an output layer of its own, which the parameter count keeps while leaving out
    the token table, now only looked up."""
    from torch.nn import functional as F
    model = tiny(**NANOCHAT).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    tied = tiny(**{**NANOCHAT, "tie_embeddings": True})
    assert model.get_num_params() == tied.get_num_params()  # lm_head counted once either way; wte not, untied
    assert model.get_num_params(non_embedding=False) == tied.get_num_params(non_embedding=False) + 50 * 32
    mlp, x = model.transformer.h[0].mlp, torch.randn(2, 3, 32)
    assert torch.allclose(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
    idx = torch.randint(0, 50, (2, 16))
    for qk_norm in (True, False):
        model = tiny(**{**NANOCHAT, "qk_norm": qk_norm}).eval()
        before, _ = model(idx, all_logits=True)
        with torch.no_grad():  # queries and keys 10x larger: the same after normalisation, sharper without it
            for block in model.transformer.h:
                qk = 32 + block.attn.n_kv_head * block.attn.head_size  # c_attn's rows: q, then k, then v
                block.attn.c_attn.weight[:qk] *= 10
                block.attn.c_attn.bias[:qk] *= 10
        after, _ = model(idx, all_logits=True)
        assert torch.allclose(before, after, atol=1e-4) == qk_norm


@pytest.mark.parametrize("kv", [1, 2])
def test_grouped_query_attention_is_attention_with_shared_key_value_heads(kv):
    """n_kv_head=kv of 4 heads computes what full attention does when query head h reads key/value head h // (4/kv)
    (c_attn's key and value rows repeated to every head that shares them, as SDPA's enable_gqa repeats them), with
    (4 - kv) heads' keys and values fewer in the weights and in the KV cache; kv=1 is multi-query attention."""
    gqa, full = tiny(n_head=4, n_kv_head=kv, rope=True).eval(), tiny(n_head=4, rope=True).eval()
    state, hs = gqa.state_dict(), 8

    def shared(t):  # (kv*hs, ...) -> (4*hs, ...): each key/value head's rows, once per query head that reads it
        return t.view(kv, hs, *t.shape[1:]).repeat_interleave(4 // kv, dim=0).reshape(4 * hs, *t.shape[1:])
    for key in [k for k in state if "c_attn" in k]:
        q, k, v = state[key].split([32, kv * hs, kv * hs])
        state[key] = torch.cat([q, shared(k), shared(v)])
    full.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.allclose(gqa(idx, all_logits=True)[0], full(idx, all_logits=True)[0], atol=1e-5)
    assert full.get_num_params() - gqa.get_num_params() == 2 * 2 * (4 - kv) * hs * (32 + 1)  # layers x (k, v) rows
    cache = gqa.new_cache(16, torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        gqa(idx[:, :5], cache=cache)
    assert cache.k[0].shape == cache.v[0].shape == (2, kv, 16, hs)
    from model import head_problems
    assert head_problems(32, 4, n_kv_head=3) == ["n_kv_head=3 must divide n_head=4 (each key and value head serves "
                                                 "as many query heads), or be 0 for n_head"]
    assert head_problems(32, 4, n_kv_head=8) and head_problems(32, 4, n_kv_head=-1) and not head_problems(32, 4, 0, 4)
    # n_kv_head=n_head is GPT-2's attention, written as 0: no departure, for export and resume alike
    assert GPTConfig(n_head=4, n_kv_head=4).n_kv_head == 0 and not GPTConfig(n_head=4, n_kv_head=4).departures()
    from train import TrainConfig
    assert TrainConfig(n_head=4, n_kv_head=4).n_kv_head == 0 and TrainConfig(n_head=4, n_kv_head=2).n_kv_head == 2


def test_rmsnorm_has_nothing_learned():
    """norm='rmsnorm' (nanochat's): every normalisation is x / rms(x), with no gain or bias to learn."""
    model = tiny(norm="rmsnorm")
    assert not [name for name, _ in model.named_parameters() if ".ln_" in name]
    assert model.get_num_params() == tiny().get_num_params() - 5 * 2 * 32  # 5 LayerNorms' gains and biases
    x = torch.randn(2, 3, 32) * 5 + 1
    for norm in (model.transformer.h[1].ln_2, model.transformer.ln_f):
        assert torch.allclose(norm(x), x / x.square().mean(-1, keepdim=True).sqrt(), atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_embed_norm_normalises_what_the_first_block_reads(norm):
    """embed_norm=True (nanochat's): the first block reads the embeddings (token, plus position without rope)
    through one more normalisation of the model's kind; off, it reads them as they are. A LayerNorm's gain and bias
    are parameters of their own, and the weights differ from GPT-2's by that layer only."""
    for rope in (False, True):
        normed, plain = tiny(embed_norm=True, norm=norm, rope=rope), tiny(norm=norm, rope=rope)
        read = {}
        for name, model in (("normed", normed), ("plain", plain)):
            model.transformer.h[0].register_forward_pre_hook(lambda m, args, name=name: read.update({name: args[0]}))
        idx = torch.randint(0, 50, (2, 7))
        plain.load_state_dict({k: v for k, v in normed.state_dict().items() if ".ln_e." not in k})
        normed(idx), plain(idx)
        assert not torch.allclose(read["plain"], read["normed"])
        assert torch.allclose(read["normed"], normed.transformer.ln_e(read["plain"]), atol=1e-6)
        rms = read["normed"].square().mean(-1).sqrt()
        # unit scale, from embeddings of 0.02 to 0.03 (the eps takes some off against their variance of 4e-4 to
        # 8e-4: LayerNorm's 1e-5, 1 to 2%; RMSNorm's float32 epsilon, 1e-4; LayerNorm also centres them)
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3 if norm == "rmsnorm" else 0.03)
        assert read["plain"].square().mean().sqrt() < 0.05
    extra = {k for k in tiny(embed_norm=True).state_dict()} - {k for k in tiny().state_dict()}
    assert extra == {"transformer.ln_e.weight", "transformer.ln_e.bias"}
    assert not {k for k in tiny(embed_norm=True, norm="rmsnorm").state_dict()} - \
        {k for k in tiny(norm="rmsnorm").state_dict()}  # RMSNorm: nothing learned


def test_logit_softcap_bounds_the_logits():
    """logit_softcap=c: the logits are c·tanh(plain logits / c), wherever they come from (the last position for
    generation, every position for scoring, the loss), so never past c."""
    capped, plain = tiny(logit_softcap=2.0).eval(), tiny().eval()
    with torch.no_grad():
        capped.lm_head.weight.mul_(10)  # logits of several units: past the cap
    plain.load_state_dict(capped.state_dict())
    plain.fused_loss = capped.fused_loss = False
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        raw, bent = plain(idx, all_logits=True)[0], capped(idx, all_logits=True)[0]
    assert raw.abs().max() > 5 and 1.9 < bent.abs().max() <= 2.0
    assert torch.allclose(bent, 2.0 * torch.tanh(raw / 2.0), atol=1e-5)
    assert torch.allclose(capped(idx)[0], bent[:, [-1]])
    loss = torch.nn.functional.cross_entropy(bent.view(-1, 50), idx.view(-1))
    assert capped(idx, idx)[1].item() == pytest.approx(loss.item(), rel=1e-5)
