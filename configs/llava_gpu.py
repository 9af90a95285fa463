# LLaVA-Pretrain (LCS-558K, BLIP captions of LAION/CC/SBU images) on one GPU: the paper's
# pre-training data. torchvision's ImageNet ResNet-50 (frozen, run every step: caching 558K
# images' features would take ~112 GB) -> MLP projector -> GPT-2 small. The reference is GPT-2
# fine-tuned on the training captions. Needs: blip_laion_cc_sbu_558k.json and images/ from the
# LLaVA-Pretrain release (~27 GB), `pip install transformers`, network once for the GPT-2 and
# ResNet-50 weights (or --gpt2_model=FOLDER, --vision_ckpt=FILE). Not yet run: no figures claimed.
dataset = 'data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'
image_root = 'data/LLaVA-Pretrain/images'
skip_bad = True
val_frac = 0.005
test_frac = 0.005
image_size = 224
arch = 'h'
vision = 'resnet50'
init_vision = 'pretrained'
freeze_vision = True
cache_features = False
init_lm = 'gpt2'
gpt2_model = 'gpt2'
block_size = 64
ref_max_iters = 4000
ref_learning_rate = 1e-4
ref_batch_size = 64
batch_size = 128
max_iters = 8700             # ~2 epochs of 558k captions
learning_rate = 2e-4
warmup_iters = 300
eval_interval = 500
eval_batches = 32
log_interval = 100
ckpt_interval = 1000
num_workers = 12
device = 'cuda'
compile = True
loss = 'prior'
out_dir = 'out/llava_prior'
