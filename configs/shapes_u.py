# U-LVLM (encoder-free, Fuyu/SOLO-style) on the built-in shapes data: raw 8x8 patches (one per
# cell of the 3x3 grid) are linearly projected into a 2x128 GPT, which starts from the text-only
# reference and trains together with the patch projection. This is what `python train.py` runs
# by default, and the study's main U preset (the study sweeps learning_rate around this value).
arch = 'u'
image_size = 24
patch_size = 8
n_layer = 2
n_embd = 128
init_lm = 'ref'
freeze_lm = False
freeze_vision = False
loss = 'prior'
max_iters = 1000
learning_rate = 4e-3
out_dir = 'out/shapes_u'
