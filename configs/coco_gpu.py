# COCO captions on one GPU, LLaVA-style: torchvision's ImageNet ResNet-50 (frozen; its 7x7 grid of
# 2048-d features computed once and cached, float16, ~24 GB for train2017) -> MLP projector ->
# GPT-2 small (124M). The reference is GPT-2 fine-tuned on the training captions. Compare
# --loss=ntp and --loss=prior (same seed: same init and batches). Needs: train2017/ images
# (18 GB) and annotations/captions_train2017.json from cocodataset.org, `pip install transformers`
# for GPT-2's weights, network once for the GPT-2 and ResNet-50 weights (or --gpt2_model=FOLDER
# and --vision_ckpt=FILE saved elsewhere). Not yet run: no figures are claimed for it.
dataset = 'data/coco/annotations/captions_train2017.json'
image_root = 'data/coco/train2017'
skip_bad = True
val_frac = 0.01
test_frac = 0.01
image_size = 224
arch = 'h'
vision = 'resnet50'
init_vision = 'pretrained'
freeze_vision = True
cache_features = True
init_lm = 'gpt2'
gpt2_model = 'gpt2'
block_size = 64
ref_max_iters = 2000
ref_learning_rate = 1e-4
ref_batch_size = 64
batch_size = 64
max_iters = 20000            # ~2 epochs of 590k captions
learning_rate = 1e-4
warmup_iters = 500
eval_interval = 1000
eval_batches = 32
log_interval = 100
ckpt_interval = 2000
num_workers = 8
device = 'cuda'
compile = True
loss = 'prior'
out_dir = 'out/coco_prior'
