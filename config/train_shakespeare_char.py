# The baby GPT: a 10.7M-parameter character-level model of tiny Shakespeare.
# Prepare the data first: python prepare.py shakespeare_char
# On a laptop CPU, shrink it: --device=cpu --compile=False --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12

out_dir = "out-shakespeare-char"
eval_interval = 250  # it overfits fast, so look often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # save at an evaluation only when val loss improves, also as best.pt (a stop signal still saves ckpt.pt, to resume)
sample_tokens = 200  # at each evaluation, print what it writes now (from the same seed: only the model changes)

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False  # nanoGPT's default too: a little faster and no worse

learning_rate = 1e-3  # small models can take a higher learning rate
max_iters = 5000
min_lr = 1e-4  # usually learning_rate / 10
beta2 = 0.99  # a little higher than GPT-2's 0.95: few tokens per step
warmup_iters = 100
