# LLaVA-Pretrain (LCS-558K, BLIP captions of LAION/CC/SBU images) on one GPU: the paper's
# pre-training data. torchvision's ImageNet ResNet-50 (frozen, run every step: caching 558K
# images' features would take ~112 GB) -> MLP projector -> GPT-2 small. The reference is GPT-2
# fine-tuned on the training captions. Needs: blip_laion_cc_sbu_558k.json and images/ from the
# LLaVA-Pretrain release (~27 GB), `pip install transformers`, network once for the GPT-2 and
# ResNet-50 weights (or --gpt2_model=FOLDER, --vision_ckpt=FILE). Not yet run: no figures claimed.
# Everything else as configs/coco_gpu.py.
from configs.coco_gpu import *  # noqa: F401,F403  (the model and the rest of the recipe)
dataset = 'data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'
image_root = 'data/LLaVA-Pretrain/images'
val_frac = 0.005
test_frac = 0.005
cache_features = False
ref_max_iters = 4000
batch_size = 128
max_iters = 8700             # ~2 epochs of 558k captions
learning_rate = 2e-4
warmup_iters = 300
eval_interval = 500
ckpt_interval = 1000
num_workers = 12
out_dir = 'out/llava_prior'
