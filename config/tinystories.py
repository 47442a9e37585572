# A small GPT that writes children's stories: TinyStories (Eldan and Li, 2023), 2.1M short stories in the words a
# 3 to 4 year old knows, on which models of a few tens of millions of parameters already write coherent English.
# Prepare the data first (GPT-2 BPE, 0.5B tokens): python prepare.py tinystories
# Then, on one GPU: python train.py config/tinystories.py
# And: python sample.py --out_dir=out-tinystories --start="Once upon a time" --temperature=0.8 --top_k=200
# Not yet trained to the end here: the schedule is a starting point, watch the val loss and stop when it flattens.

out_dir = "out-tinystories"
wandb_run_name = "tinystories"

dataset = "tinystories"
batch_size = 32
block_size = 512  # a story is a few hundred tokens
gradient_accumulation_steps = 4  # 32 x 512 x 4 = 65,536 tokens per step
data_order = "epochs"  # each story's windows once per pass over the data, shuffled anew each pass

# 25M parameters in the blocks, 26M in the (tied) token embedding of GPT-2's 50,257-token vocabulary. A vocabulary
# of its own shrinks that to 2M and makes the output layer 12x cheaper (llama2.c's TinyStories models use 4,096):
# python prepare.py tinystories --tokenizer=bpe:4096, then this config as it is
n_layer = 8
n_head = 8
n_embd = 512
dropout = 0.0
bias = False

learning_rate = 1e-3  # smaller models take a higher learning rate than GPT-2 small's 6e-4
max_iters = 20000  # 1.3B tokens: about 2.6 passes over the train split
min_lr = 1e-4
warmup_iters = 1000
beta2 = 0.99  # a little above GPT-2's 0.95: fewer tokens per step
weight_decay = 0.1

eval_interval = 500
eval_tokens = 1048576  # the first 1M tokens of each split, every one predicted once
sample_tokens = 100  # and a story's start at each evaluation
sample_start = "Once upon a time"
log_interval = 10
