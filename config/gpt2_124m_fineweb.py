# Reproduce GPT-2 small (124M) on 10B tokens of FineWeb-Edu: the recipe of Karpathy's build-nanogpt and llm.c,
# with HellaSwag scored along the way (evaluate.py --init_from=gpt2 --task=hellaswag gives OpenAI's model's score).
# Prepare the data first (10B GPT-2 tokens, about 20 GB; shard 0 is val): python prepare.py fineweb_edu
# One node of 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_fineweb.py
# Slurm: sbatch slurm/train.sbatch config/gpt2_124m_fineweb.py

out_dir = "out-gpt2-124m-fineweb"
wandb_run_name = "gpt2-124m-fineweb"

dataset = "fineweb_edu"
batch_size = 32  # sequences per GPU per micro-step: 32 fits 40 GB and more; on 24 GB GPUs use 16
block_size = 1024
total_batch_size = 524288  # 2**19 tokens per optimizer step; micro-steps are derived (2 a step on 8 GPUs)
# every window once, in a shuffled order: the one pass below (random windows would leave a third of it unseen)
data_order = "epochs"

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True

# one pass over the 10B tokens: 19,073 steps of 2**19 tokens, the first 715 (375M tokens) warming up
learning_rate = 6e-4
max_iters = 19073  # the decay ends with the run (lr_decay_iters=0)
min_lr = 6e-5
warmup_iters = 715
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_tokens = 10485760  # the first 10M tokens of each split, every one predicted once: the same numbers every time
hellaswag = True  # 10,042 items at each evaluation, shared by the GPUs: seconds
sample_tokens = 32  # a glimpse of what it writes at each evaluation, as build-nanogpt prints
sample_start = "Hello, I'm a language model,"
log_interval = 10
