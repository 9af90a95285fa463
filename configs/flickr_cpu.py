# Real photos on 2 CPU cores: Flickr8k (the 128x128 copy in ../shared, research use only).
# H-LVLM: a small ViT (48 px photos in 12 px patches -> 16 tokens) pretrained contrastively on
# the training photos and captions (encoder.py, our offline CLIP stand-in), frozen, its features
# cached; an MLP projector feeds them to a 4x128 GPT that starts from the text-only reference.
# Compare --loss=ntp and --loss=prior (same seed: same init and batches).
dataset = '../shared/data/flickr8k'
skip_bad = True              # Flickr8k has 7 duplicate rows: skipped and counted
image_size = 48
patch_size = 12
block_size = 40              # longer captions are truncated (and counted)
arch = 'h'
vision = 'vit'
vit_layer = 3
vit_embd = 128
init_vision = 'clip'
freeze_vision = True
enc_max_iters = 1500
enc_batch_size = 128
enc_learning_rate = 1e-3
n_layer = 4
n_head = 4
n_embd = 128
init_lm = 'ref'
ref_max_iters = 400
ref_batch_size = 64
batch_size = 32
max_iters = 2000
learning_rate = 1e-3
warmup_iters = 50
eval_interval = 250
eval_batches = 8
log_interval = 50
ckpt_interval = 500
loss = 'prior'
out_dir = 'out/flickr_prior'
