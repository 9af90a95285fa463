# Flickr8k on one GPU with GPT-2 small (124M) as the LM: the encoder-free U-LVLM at full
# resolution (128x128 photos in 16x16 patches -> 64 image tokens), everything trained.
# The reference is GPT-2 fine-tuned on the training captions alone; the LVLM's LM starts
# from GPT-2 itself. Compare --loss=ntp and --loss=prior (same seed: same init and batches).
# Offline nodes: --gpt2_model=FOLDER saved with GPT2LMHeadModel.from_pretrained('gpt2').save_pretrained(FOLDER).
# Not yet run: no GPU was available when it was written (see docs/real-photos.md).
dataset = '../shared/data/flickr8k'
image_size = 128
patch_size = 16
block_size = 48              # longer captions are truncated (and counted)
arch = 'u'
init_lm = 'gpt2'
gpt2_model = 'gpt2'
ref_max_iters = 500          # about one epoch of the training captions
ref_learning_rate = 1e-4     # fine-tuning a pretrained LM: small steps
ref_batch_size = 64
batch_size = 64
max_iters = 3000             # about 6 epochs of the training captions
learning_rate = 3e-4
warmup_iters = 100
eval_interval = 250
eval_batches = 16
log_interval = 50
ckpt_interval = 500
num_workers = 4
skip_bad = True           # Flickr8k has 7 duplicate rows: skipped and counted
loss = 'prior'
out_dir = 'out/flickr_gpu_prior'
