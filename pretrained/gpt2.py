"""
GPT-2's weights from Hugging Face (`pip install transformers`; a hub name needs the network once,
or a save_pretrained() folder), renamed to model.GPT's parameters. HF's Conv1D stores a weight as
[in, out] where nn.Linear stores [out, in], hence the transposes.
"""

from runs.errors import ConfigError

RENAMES = {'attn.c_attn': 'attn.qkv', 'attn.c_proj': 'attn.proj', 'mlp.c_fc': 'mlp.fc', 'mlp.c_proj': 'mlp.proj'}


def transformers_module():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("--init_lm=gpt2 needs the transformers package: pip install transformers") from e
    return transformers


def gpt2_shape(name):
    """(n_layer, n_head, n_embd) of a GPT-2-family checkpoint, read from its config alone."""
    c = transformers_module().GPT2Config.from_pretrained(name)
    return c.n_layer, c.n_head, c.n_embd


def converted_state_dict(hf_model, block_size):
    """A transformers GPT2LMHeadModel's weights under model.GPT's names, its positions cut to
    block_size (refused if it has fewer); lm_head is wte (tied)."""
    ours = {}
    for key, value in hf_model.state_dict().items():
        if not key.startswith('transformer.') or key.endswith(('.attn.bias', '.attn.masked_bias')):
            continue                          # lm_head is tied; attn.bias is HF's causal mask buffer
        name = key[len('transformer.'):]
        for hf, mine in RENAMES.items():
            name = name.replace(hf, mine)
        is_conv1d = any(h in key for h in RENAMES) and key.endswith('.weight')
        ours[name] = value.t() if is_conv1d else value
    if len(ours['wpe.weight']) < block_size:
        raise ConfigError(f"block_size {block_size} exceeds the {len(ours['wpe.weight'])} positions of GPT-2")
    ours['wpe.weight'] = ours['wpe.weight'][:block_size]
    ours['lm_head.weight'] = ours['wte.weight']
    return ours


def load_gpt2_into(gpt, name):
    """Initialise `gpt` (same shape, any block_size up to the checkpoint's) from the GPT-2 weights `name`."""
    hf_model = transformers_module().GPT2LMHeadModel.from_pretrained(name)
    gpt.load_state_dict(converted_state_dict(hf_model, gpt.config.block_size))
