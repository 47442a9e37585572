#!/usr/bin/env bash
# The measurements behind the README's GPU figures (issue 8), in one go, on one CUDA GPU:
#     python prepare.py shakespeare_char && bash benchmarks/gpu.sh [results folder] [another train.py to compare]
# Each command's output goes to the results folder (default: gpu-results/) and to the terminal; every bench prints
# JSON lines to compare across commits. A second train.py (e.g. a branch's copy) is timed to the baby GPT's target
# val loss in the same session, right after this one's; the bench.py beside it times GPT-2 small's step and
# decoding. A .patch
# in its place (benchmarks/experiments/) is applied to a copy of this tree, whose train.py is then the other one.
# ONLY="tests sample" runs just the parts named, the OPT_IN ones below included; PYTHON picks the interpreter
# (default python3). All of it but OPT_IN takes about 17 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
other=${2:-}
mkdir -p "$out"
py=${PYTHON:-python3}
if [[ "$other" == *.patch ]]; then  # an experiment: this tree's code with the patch applied, beside the results
    tree="$out/other-tree"
    rm -rf "$tree" && mkdir -p "$tree" && cp -r ./*.py config tests "$tree"/ || exit 1
    patch -d "$tree" -p1 --quiet < "$other" || { echo "$other does not apply to this tree" >&2; exit 1; }
    other="$tree/train.py"
fi
OPT_IN="baby_short baby_short_eval500 baby_eval_tokens100 baby_b128"  # only when named
OPT_IN+=" gpt2_b32_cdt gpt2_b32_autotune gpt2_b32_recompute baby_muon gpt2_b32_muon baby_rope"
OPT_IN+=" gpt2_b32_nanochat sample_mqa"
run() {  # name, command...
    local name=$1; shift
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    if [ -z "${ONLY:-}" ] && [[ " $OPT_IN " == *" $name "* ]]; then return; fi
    echo "== $name: $*" | tee "$out/$name.txt"
    "$@" 2>&1 | tee -a "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"

run tests $py -m pytest -q -rs tests/test_gpu.py
fast=(config/train_shakespeare_char.py --compile_mode=reduce-overhead --eval_batch_size=1600)
baby=("${fast[@]}" --max_iters=2500)
run baby_time_to_loss $py benchmarks/time_to_loss.py --target=1.47 --runs=2 "${baby[@]}"
# the same, evaluating all of val (and as many train tokens) exactly, in one pass each instead of 8 of 1,600 sequences
run baby_eval_tokens $py benchmarks/time_to_loss.py --target=1.47 --runs=2 "${baby[@]}" --eval_tokens=131072
if [ -n "$other" ]; then
    run baby_time_to_loss_other $py benchmarks/time_to_loss.py --train="$other" --target=1.47 --runs=2 "${baby[@]}"
fi
# shorter learning-rate schedules (the same shapes: they find the cache the runs above warmed): the cosine decay
# ends sooner, so the loss comes down sooner; an evaluation every 500 steps costs half as many
short=(--max_iters=2000 --lr_decay_iters=2000)
run baby_short $py benchmarks/time_to_loss.py --target=1.47 --runs=1 "${fast[@]}" "${short[@]}"
run baby_short_eval500 $py benchmarks/time_to_loss.py --target=1.47 --runs=1 "${fast[@]}" "${short[@]}" \
    --eval_interval=500
# exact evaluations cost little, so they can come often: the first at or below the target is found sooner
exact=(--eval_tokens=131072 --eval_batch_size=512)
run baby_eval_tokens100 $py benchmarks/time_to_loss.py --target=1.47 --runs=2 "${baby[@]}" "${exact[@]}" \
    --eval_interval=100
# launch-bound: a step of 128 sequences should cost far less than two of 64, so fewer, larger steps (learning rate
# scaled by the square root of the batch); new shapes, so the first run compiles cold
run baby_b128 $py benchmarks/time_to_loss.py --target=1.47 --runs=2 "${fast[@]}" "${exact[@]}" --batch_size=128 \
    --max_iters=1000 --lr_decay_iters=1000 --learning_rate=1.4e-3 --warmup_iters=50 --eval_interval=50
# Muon (changes the optimizer, so opt-in): on the CPU quickstart it reached AdamW's 2,000-step val loss in under
# 1,250 steps (README), so a shorter schedule
run baby_muon $py benchmarks/time_to_loss.py --target=1.47 --runs=2 "${fast[@]}" "${exact[@]}" --optimizer=muon \
    --max_iters=1500 --lr_decay_iters=1500 --eval_interval=100
# RoPE (changes the model, so opt-in): on the CPU quickstart it passed the learned table's 2,000-step val loss
# between steps 1,000 and 1,250 (README), at about 6% more per step; the same shorter schedule as Muon's
run baby_rope $py benchmarks/time_to_loss.py --target=1.47 --runs=2 "${fast[@]}" "${exact[@]}" --rope=True \
    --max_iters=1500 --lr_decay_iters=1500 --eval_interval=100
run baby_profile $py bench.py train config/train_shakespeare_char.py --compile_mode=reduce-overhead --profile=True
gpt2=(config/gpt2_124m.py --total_batch_size=0 --gradient_accumulation_steps=1 --steps=20 --warmup=5)
run gpt2_b32 $py bench.py train "${gpt2[@]}" --batch_size=32 --profile=True
run gpt2_b32_fused $py bench.py train "${gpt2[@]}" --batch_size=32 --fused_loss=True
run gpt2_b32_recompute $py bench.py train "${gpt2[@]}" --batch_size=32 --recompute=True  # its memory and time
run gpt2_b32_muon $py bench.py train "${gpt2[@]}" --batch_size=32 --optimizer=muon  # what Newton-Schulz costs a step
# nanochat's departures from GPT-2 (4 key/value heads for 12 query heads): what they cost a step
run gpt2_b32_nanochat $py bench.py train "${gpt2[@]}" --batch_size=32 --rope=True --qk_norm=True --mlp=relu2 \
    --tie_embeddings=False --n_kv_head=4 --norm=rmsnorm --logit_softcap=15 --embed_norm=True
# compiler settings that change no math, measured before any becomes a default (long compiles: OPT_IN)
run gpt2_b32_cdt env TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 $py bench.py train "${gpt2[@]}" --batch_size=32
run gpt2_b32_autotune $py bench.py train "${gpt2[@]}" --batch_size=32 --compile_mode=max-autotune-no-cudagraphs
if [ -n "$other" ]; then  # the other tree's bench.py times the other tree's optimizer step
    run gpt2_b32_other $py "$(dirname "$other")/bench.py" train "${gpt2[@]}" --batch_size=32
fi
run sample $py bench.py sample --device=cuda --batch_sizes=1,8,64 --compile=True
# multi-query attention: a KV cache 12 times smaller (enable_gqa's kernels, masked ones included, on this GPU)
run sample_mqa $py bench.py sample --device=cuda --batch_sizes=1,8,64 --compile=True --n_kv_head=1
if [ -n "$other" ]; then  # the other tree's bench.py decodes with the other tree's generate.py
    run sample_other $py "$(dirname "$other")/bench.py" sample --device=cuda --batch_sizes=1,8,64 --compile=True
fi
