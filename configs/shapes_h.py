# H-LVLM (LLaVA-style) on the built-in shapes data: a small ViT and a 2-layer MLP projector
# feed the GPT, which is the text-only reference, frozen. Only vision and projector learn
# (LLaVA's first stage freezes a pretrained encoder too; ours starts from scratch, so it trains).
arch = 'h'
init_lm = 'ref'
freeze_lm = True
freeze_vision = False
loss = 'prior'
learning_rate = 2e-3
out_dir = 'out/shapes_h'
