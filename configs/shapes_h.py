# H-LVLM (LLaVA-style) on the built-in shapes data: a 2x128 ViT pretrained offline (encoder.py:
# contrastively against the training captions, CLIP-style; our stand-in for CLIP, built on first
# use and cached) is frozen, and an MLP projector feeds its 9 patch features to a 2x128 GPT that
# starts from the text-only reference. Projector and LM train. The study's main H preset; it also
# runs it with the LM frozen (--freeze_lm=True: LLaVA's first stage alone).
arch = 'h'
image_size = 24
patch_size = 8
vit_layer = 2
vit_embd = 128
init_vision = 'clip'
freeze_vision = True
n_layer = 2
n_embd = 128
init_lm = 'ref'
freeze_lm = False
loss = 'prior'
max_iters = 1000
learning_rate = 4e-3
out_dir = 'out/shapes_h'
