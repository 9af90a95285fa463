# U-LVLM (encoder-free, Fuyu/SOLO-style) on the built-in shapes data: raw 8x8 patches are
# linearly projected into the GPT, which starts from the text-only reference and is trained
# together with the patch projection. This is also what `python train.py` runs by default.
arch = 'u'
init_lm = 'ref'
freeze_lm = False
freeze_vision = False
loss = 'prior'
learning_rate = 2e-3
out_dir = 'out/shapes_u'
