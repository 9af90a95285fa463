# Real photos on 2 CPU cores: Flickr8k (the 128x128 copy in ../shared, research use only).
# H-LVLM: a ResNet-18 at 64 px (a 2x2 grid of 512-d features -> 4 image tokens), pretrained here on
# the training photos to tell which caption words describe each one (encoder.py's 'words': 15
# epochs of cropped and flipped photos; CLIP-style pretraining did not generalise from 6,400
# photos), then frozen with its features cached; an MLP projector feeds them to a 4x128 GPT that
# starts from the text-only reference. 4,000 steps, chosen on val: with an exploratory copy of this
# encoder they gave val R@1 0.19 against 0.175 for 2,000. Compare --loss=ntp and --loss=prior
# (same seed: same init and batches), or run `python -m study.flickr` for several seeds.
dataset = '../shared/data/flickr8k'
skip_bad = True              # Flickr8k has 7 duplicate rows: skipped and counted
image_size = 64
patch_size = 8
block_size = 40              # longer captions are truncated (and counted)
arch = 'h'
vision = 'resnet18'
init_vision = 'words'
freeze_vision = True
enc_max_iters = 1500         # 64 photos a step: 15 epochs of the 6,378 training photos
enc_batch_size = 64
enc_learning_rate = 3e-3
n_layer = 4
n_head = 4
n_embd = 128
init_lm = 'ref'
ref_max_iters = 400
ref_batch_size = 64
batch_size = 32
max_iters = 4000
learning_rate = 1e-3
warmup_iters = 50
eval_interval = 500
eval_batches = 8
log_interval = 100
ckpt_interval = 1000
loss = 'prior'
out_dir = 'out/flickr_prior'
