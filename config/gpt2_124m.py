# Reproduce GPT-2 small (124M) on OpenWebText, as nanoGPT and llm.c do.
# Prepare the data first: python prepare.py openwebtext
# One node of 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# Slurm: sbatch slurm/train.sbatch config/gpt2_124m.py

out_dir = "out-gpt2-124m"
wandb_run_name = "gpt2-124m"

dataset = "openwebtext"
batch_size = 16  # sequences per GPU per micro-step, a power of two (it divides total_batch_size); 32 fits an 80 GB GPU
block_size = 1024
total_batch_size = 524288  # 2**19 tokens per optimizer step, about GPT-2's 0.5M; micro-steps are derived from it

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True

learning_rate = 6e-4
max_iters = 600000  # 300B tokens: a starting point, about 3x what GPT-2 small needs to match its val loss
# lr_decay_iters: the default, 0, ends the decay with the run, whatever max_iters (or max_tokens) says
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
sample_tokens = 32  # a glimpse of what it writes at each evaluation, as build-nanogpt prints
sample_start = "Hello, I'm a language model,"
log_interval = 10
