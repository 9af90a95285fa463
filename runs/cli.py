"""
The command line of every entry point: `--key=value` flags read as the type of their default,
an unknown flag answered with the nearest known one, and every mistake ended in one line on
stderr with an exit status (2 for settings and input, RunStopped's own otherwise), never a traceback.
"""

import ast
import difflib
import sys

from runs.errors import ConfigError, Interrupted, OutDirBusy, RunStopped


def parse_bool(text):
    low = text.lower()
    if low in ('true', '1', 'yes'):
        return True
    if low in ('false', '0', 'no'):
        return False
    raise ConfigError(f"expected True or False, got {text!r}")


def coerce(key, value, default):
    """Return `value` as the type of `default`, or raise with the key's name."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        try:
            value = parse_bool(value) if kind is bool else ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"config key {key!r}: cannot read {value!r} as {kind.__name__} ({e})")
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


# Names other tools use for a setting, so that --lr says what to write instead.
ALIASES = {'lr': 'learning_rate', 'bs': 'batch_size', 'batch': 'batch_size', 'iters': 'max_iters',
           'steps': 'max_iters', 'max_steps': 'max_iters', 'epochs': 'max_iters', 'wd': 'weight_decay',
           'warmup': 'warmup_iters', 'warmup_steps': 'warmup_iters', 'clip': 'grad_clip', 'max_grad_norm': 'grad_clip',
           'gradient_accumulation_steps': 'grad_accum', 'accum': 'grad_accum', 'workers': 'num_workers',
           'output_dir': 'out_dir', 'out': 'out_dir', 'data': 'dataset', 'dtype': 'precision',
           'layers': 'n_layer', 'n_layers': 'n_layer', 'heads': 'n_head', 'n_heads': 'n_head', 'd_model': 'n_embd',
           'hidden_size': 'n_embd', 'seq_len': 'block_size', 'context_length': 'block_size'}


def unknown_key(key, known, origin):
    """The error for a key that is not a setting, with the nearest known one (or what others call it)."""
    near = [ALIASES[key]] if ALIASES.get(key) in known else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean --{near[0]}?" if near else "see --help for every setting"
    return ConfigError(f"unknown setting {key!r} (from {origin}): {hint}")


def split_flag(arg):
    key, sep, value = arg[2:].partition('=') if arg.startswith('--') else ('', '', '')
    if not sep:
        raise ConfigError(f"argument {arg!r} must look like --key=value")
    return key, value


def parse_flags(argv, defaults):
    """`--key=value` flags over a dict of defaults (for small CLIs such as eval.py)."""
    out = dict(defaults)
    for arg in argv:
        key, value = split_flag(arg)
        if key not in defaults:
            raise unknown_key(key, defaults, 'command line')
        out[key] = coerce(key, value, defaults[key])
    return out


def cli(main, argv, doc, flags_help=''):
    """Run an entry point's main(argv). --help/-h prints `doc` and `flags_help`; a settings mistake
    (ConfigError) ends in one line on stderr and exit status 2, as argparse does."""
    if '--help' in argv or '-h' in argv:
        print(doc.strip() + '\n\n' + flags_help)
        raise SystemExit(0)
    try:
        main(argv)
    except (ConfigError, OutDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.status)
    except KeyboardInterrupt:                    # Ctrl-C where no run is there to save
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(Interrupted.status)
