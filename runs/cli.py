"""
The command line of every entry point: `--key=value` flags read as the type of their default and
checked against their range (train.py's settings and the small tools' flags alike), an unknown flag
answered with the nearest known one, and every mistake ended in one line on stderr with an exit
status (2 for settings and input, RunStopped's own otherwise), never a traceback.
"""

import ast
import difflib
import math
import signal
import threading
from dataclasses import dataclass

from runs.errors import ConfigError, Interrupted, OutDirBusy, RunStopped, print_error
from runs.startup import SIGNALS


def parse_bool(text):
    low = text.lower()
    if low in ('true', '1', 'yes'):
        return True
    if low in ('false', '0', 'no'):
        return False
    raise ConfigError(f"expected True or False, got {text!r}")


def read_text(value, kind):
    """A flag's text as `kind`: True/False for a bool, a number as Python writes it (float: also nan and inf,
    refused later by name), or a literal."""
    if kind is bool:
        return parse_bool(value)
    if kind is float:
        try:
            return float(value)
        except ValueError:
            pass
    return ast.literal_eval(value)


def coerce(key, value, default, name=None):
    """Return `value` as the type of `default`, or raise naming the setting (`name`, or 'config key KEY').
    A float must be finite."""
    kind, name = type(default), name or f"config key {key!r}"
    if isinstance(value, str) and kind is not str:
        try:
            value = read_text(value, kind)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"{name}: cannot read {value!r} as {kind.__name__} ({e})")
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return check_value(name, value)


def check_value(name, value, low=None, high=None, choices=()):
    """`value` of the setting `name`, if it is a finite number (floats) within [low, high] (None: no
    bound; low '> 0': any value above zero) and one of `choices` (if given); else ConfigError, one line."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    if low == '> 0' and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    if (low not in (None, '> 0') and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
            f">= {low}" if high is None else f"<= {high}"
        raise ConfigError(f"{name} must be {bounds}, got {value!r}")
    return value


@dataclass(frozen=True)
class Flag:
    """One flag of a tool: its default (which fixes its type), the values it takes (check_value's low,
    high and choices) and a line of help. A tool declares each flag once, as {name: Flag(...)}."""
    default: object
    low: object = None
    high: object = None
    choices: tuple = ()
    help: str = ''

    def read(self, key, text):
        name = f"--{key}"
        return check_value(name, coerce(key, text, self.default, name), self.low, self.high, self.choices)


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


def as_flag(spec):
    return spec if isinstance(spec, Flag) else Flag(spec)        # a bare default: any value of its type


def parse_flags(argv, flags):
    """`--key=value` flags of a small CLI such as eval.py, over {name: Flag, or a bare default}:
    {name: value}, each read as its default's type and checked against its range."""
    out = {key: as_flag(spec).default for key, spec in flags.items()}
    for arg in argv:
        key, value = split_flag(arg)
        if key not in flags:
            raise unknown_key(key, flags, 'command line')
        out[key] = as_flag(flags[key]).read(key, value)
    return out


def takes(spec):
    """The values a Flag takes, in words ('' for any value of its type)."""
    if spec.choices:
        return f"one of {', '.join(map(str, spec.choices))}"
    low = '> 0' if spec.low == '> 0' else f">= {spec.low}" if spec.low is not None else ''
    return ', '.join(x for x in (low, f"<= {spec.high}" if spec.high is not None else '') if x)


def flags_help(flags):
    """--help's list of a tool's flags: each with its default, its line of help and the values it takes."""
    lines = ['Flags (--key=value; defaults):']
    for key, spec in flags.items():
        spec = as_flag(spec)
        values = f" ({takes(spec)})" if takes(spec) else ''
        lines.append(f"  --{key}={spec.default}".ljust(32) + f" {spec.help}{values}")
    return '\n'.join(lines)


def interrupt(signum, frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def signal_inside(error):
    """The Interrupted that a library caught and re-raised as an error of its own, or None: tiktoken turns
    any exception while it parses its ranks into a ValueError, so a Ctrl-C at that moment would otherwise
    end in that ValueError's traceback."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def cli(main, argv, doc, flags_help=''):
    """Run an entry point's main(argv). --help/-h prints `doc` and `flags_help`; a settings mistake
    (ConfigError) ends in one line on stderr and exit status 2, as argparse does; SIGTERM or SIGINT
    where no run is there to save ends in one line and status 3 (a run installs its own handling)."""
    if '--help' in argv or '-h' in argv:
        print(doc.strip() + '\n\n' + flags_help)
        raise SystemExit(0)
    main_thread = threading.current_thread() is threading.main_thread()   # Python handles signals there only
    previous = {s: signal.signal(s, interrupt) for s in SIGNALS} if main_thread else {}
    try:
        main(argv)
    except (ConfigError, OutDirBusy) as e:
        print_error(str(e))
        raise SystemExit(2)
    except RunStopped as e:
        print_error(str(e))
        raise SystemExit(e.status)
    except KeyboardInterrupt:                    # Ctrl-C where no run is there to save
        print_error("interrupted")
        raise SystemExit(Interrupted.status)
    except Exception as e:
        stopped = signal_inside(e)
        if stopped is None:
            raise
        print_error(str(stopped))
        raise SystemExit(stopped.status)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
