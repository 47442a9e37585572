# Fine-tune OpenAI's GPT-2 (124M) on tiny Shakespeare: minutes on one GPU.
# Prepare the data first (GPT-2 BPE): python prepare.py shakespeare
# Then: python train.py config/finetune_shakespeare.py
# Bigger GPT-2s: --init_from=gpt2-medium, gpt2-large or gpt2-xl (lower batch_size, raise gradient_accumulation_steps).
# Any Hugging Face GPT-2 folder works too, e.g. one written by export.py: --init_from=hf-my-model

out_dir = "out-shakespeare"
init_from = "gpt2"  # downloaded from the Hugging Face Hub on first use
eval_interval = 10
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # the best model is out_dir/best.pt: it starts overfitting within a few hundred steps
sample_tokens = 64  # at each evaluation, how its Shakespeare reads now
sample_start = "ROMEO:"

dataset = "shakespeare"
batch_size = 8
block_size = 512  # GPT-2's 1024 position table is cropped; Shakespeare's lines do not need more
gradient_accumulation_steps = 4  # 8 x 512 x 4 = 16,384 tokens per step: about 20 steps per epoch

dropout = 0.1  # GPT-2 was trained with 0.1; it helps against overfitting this small dataset

# a small constant learning rate: fine-tuning only nudges pretrained weights
learning_rate = 3e-5
min_lr = 3e-6
decay_lr = False
max_iters = 100
