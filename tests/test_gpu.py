"""What only a GPU can show: compiled bf16 training with the fused loss, attention kernel order, pinned batch copies,
decoding through CUDA graphs, torchrun on one GPU. Skipped on machines without CUDA (CI); run them on a GPU with
python -m pytest -q tests/test_gpu.py."""

import pytest
import torch

from conftest import run_script
from test_distributed import COMMON, prepare_tiny, run_torchrun, train_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = [a.replace("--device=cpu", "--device=cuda") for a in COMMON]
# nanochat's departures from GPT-2 (grouped-query attention: 2 key/value heads for 4 query heads), so that each test
# also runs SDPA's enable_gqa and the soft-capped loss on the GPU's kernels
ARCHS = {"gpt2": {}, "nanochat": dict(rope=True, qk_norm=True, mlp="relu2", tie_embeddings=False, n_kv_head=2,
                                      norm="rmsnorm", logit_softcap=15.0, embed_norm=True)}


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_fused_loss_matches_unfused_in_bf16(arch):
    """torch.compile + bf16 autocast: LinearCrossEntropy gives the loss and gradients of logits + F.cross_entropy."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=50257, **ARCHS[arch])
    fused, plain = GPT(config).cuda(), GPT(config).cuda()
    plain.load_state_dict(fused.state_dict())
    plain.fused_loss = False
    idx = torch.randint(0, 50257, (8, 128), device="cuda")
    targets = torch.randint(0, 50257, (8, 128), device="cuda")
    losses = []
    for model in (fused, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = torch.compile(model)(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.999, (name, cos.item())


def test_compiled_recompute_matches_and_holds_less_memory():
    """recompute=True under torch.compile and bf16: the loss and gradients of the plain model, and a lower peak of
    GPU memory over the step."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=512, vocab_size=512)  # the blocks' memory rules
    idx = torch.randint(0, 512, (16, 512), device="cuda")
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPT(config).cuda()
        model.recompute = recompute
        compiled = torch.compile(model)
        for _ in range(2):  # the first step compiles; the second is measured
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = compiled(idx, idx)
            loss.backward()
        results.append((loss.item(), [p.grad.float() for p in model.parameters()],
                        torch.cuda.max_memory_allocated() - before))
        del model, compiled
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-3)
    assert all(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
               for a, b in zip(results[0][1], results[1][1]))
    assert results[1][2] < 0.6 * results[0][2], (results[1][2], results[0][2])


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_decoding_matches_eager(arch):
    """sample.py --compile on CUDA (reduce-overhead: CUDA graphs, replayed with the static cache written in place)
    generates the eager cache's tokens, across two calls (a new cache: re-recorded, not wrong), from a one-token prompt,
    and in beam search."""
    from generate import beam_search, generate
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=500, **ARCHS[arch]))
    model = model.cuda().eval()
    with torch.no_grad():  # peaked distributions, so kernel-level rounding differences cannot flip an argmax
        model.lm_head.weight.mul_(20)
    # a one-token prompt (sample.py's default start) is prefilled by the compiled step itself, cache allocation and all
    for prompts in ([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], [[7]]):
        eager = generate(model, prompts, 60, temperature=0)
        for _ in range(2):
            assert generate(model, prompts, 60, temperature=0, compile=True) == eager
    eager_beams = beam_search(model, [3, 4, 5], 20, num_beams=3, early_stopping=False)
    compiled_beams = beam_search(model, [3, 4, 5], 20, num_beams=3, early_stopping=False, compile=True)
    assert [t for _, t in compiled_beams] == [t for _, t in eager_beams]


def test_attention_order_is_applied():
    """fast_kernels puts the chosen backend first; 'math' first gives the reference result."""
    from distributed import fast_kernels
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    outs = {}
    for name in ("auto", "flash", "math"):
        kernels, note = fast_kernels("cuda", name)
        with kernels:
            outs[name] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float()
        assert note.startswith("attention: ")
    assert torch.allclose(outs["auto"], outs["math"], atol=2e-2)
    assert torch.allclose(outs["flash"], outs["math"], atol=2e-2)


def test_batches_reach_the_gpu_whole():
    """to_device copies a batch's strided views (inputs and targets share one array) to the GPU as they are."""
    import numpy as np
    from train import to_device
    rows = np.arange(4 * 9, dtype=np.int64).reshape(4, 9)
    x, y = to_device(rows[:, :-1], rows[:, 1:], "cuda")
    torch.cuda.synchronize()
    assert x.is_cuda and torch.equal(x.cpu(), torch.from_numpy(rows[:, :-1].copy()))
    assert torch.equal(y.cpu(), torch.from_numpy(rows[:, 1:].copy()))


def test_masked_attention_skips_cudnn_under_flash_first():
    """Under 'flash' (decoding's and evaluation's choice) a call with a mask, which flash cannot take, goes to the
    memory-efficient kernel, not to cuDNN's, which plans anew for each of decoding's shapes."""
    from distributed import fast_kernels
    q, k, v = (torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k, v = torch.randn_like(k.expand(-1, -1, 40, -1)), torch.randn_like(v.expand(-1, -1, 40, -1))
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool, device="cuda")
    mask[0, :, :, :5] = False  # left padding of row 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with fast_kernels("cuda", "flash")[0]:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert "aten::_scaled_dot_product_efficient_attention" in ops and not any("cudnn" in op for op in ops), ops


def test_torchrun_one_gpu_matches_python(tmp_path, prepared_shakespeare):
    """A single-GPU run under torchrun --nproc_per_node=1 follows plain python step for step."""
    prepare_tiny(tmp_path, prepared_shakespeare)
    args = [*GPU, "--batch_size=8", "--compile=True", "--dtype=bfloat16"]
    run_script("train.py", *args, "--out_dir=python", cwd=tmp_path)
    out = run_torchrun(tmp_path, *args, "--out_dir=torchrun", nproc=1)
    assert "launch: torchrun, 1 process(es)" in out.stdout
    plain, launched = train_losses(tmp_path / "python"), train_losses(tmp_path / "torchrun")
    assert sorted(launched) == list(range(1, 11))
    for step in plain:
        assert abs(plain[step] - launched[step]) < 1e-3, (step, plain[step], launched[step])
