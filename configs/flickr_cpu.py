# Real photos: Flickr8k (128x128 copy in ../shared, research use only), on a CPU in ~15 min.
# U-LVLM (encoder-free): 64x64 images in 8x8 patches -> 64 image tokens; the GPT starts from
# the text-only reference trained on the training captions. Compare --loss=ntp and --loss=prior.
dataset = '../shared/data/flickr8k'
image_size = 64
patch_size = 8
block_size = 40              # longer captions are truncated (and counted)
arch = 'u'
init_lm = 'ref'
n_layer = 4
n_head = 4
n_embd = 128
ref_max_iters = 400
ref_batch_size = 64
batch_size = 32
max_iters = 1000
learning_rate = 1e-3
warmup_iters = 50
eval_interval = 200
log_interval = 50
ckpt_interval = 200
skip_bad = True           # Flickr8k has 7 duplicate rows: skipped and counted
loss = 'prior'
out_dir = 'out/flickr_u_prior'
