"""
The replication study: does PRIOR beat NTP on the shapes data, where, why, and at what cost.

    python -m study                    # the full protocol (about 2 hours on 2 CPU cores), into study/results/
    python -m study --report           # only rebuild the report from the run JSONs
    python -m study --preset=tiny      # the same phases at toy size (about a minute; the tests use it)
    python -m study --preset=beyond    # beyond PRIOR: the gain weightings and the label ceiling, into study/results_beyond/

Options: --jobs=N runs at a time (default 2, one per core) with --threads=N torch threads each
(default 1); --seeds=6,7,8 and --data_seed=N re-run the protocol on other seeds or other data (by
default into study/results_<preset>_data<N>_seeds<...>/, or --results=DIR); --out=DIR for
checkpoints (default out/study/<results folder>). Every run writes <results>/runs/<name>.json, and a
run whose JSON exists is skipped, so an interrupted study resumes where it stopped; one made with
other settings (another data seed, preset or config file) is refused before anything runs.

The protocol (study/plan.py): for each setting (configs/shapes_u.py, configs/shapes_h.py) and
objective of the preset (full: NTP, PRIOR, PRIOR + weight floor), a learning-rate sweep on val;
then every objective at its rate with every seed, on clean and on noisy training captions; scaling
in compute and in data (U); the H-LVLM with its LM frozen too. The report (study/report.py) holds
the statistics.
"""

import os
import sys

os.environ.setdefault('OMP_NUM_THREADS', '1')   # before torch: worker processes inherit it

from runs.cli import cli, parse_flags  # noqa: E402
from runs.errors import ConfigError  # noqa: E402
from study.plan import PRESETS, check_runs, load_runs, results_folder, run_protocol  # noqa: E402
from study.report import write_report  # noqa: E402

FLAGS = {'preset': 'full', 'report': False, 'jobs': 2, 'threads': 1, 'seeds': '', 'data_seed': 1234,
         'results': '', 'out': ''}


def main(argv):
    args = parse_flags(argv, FLAGS)
    if args['preset'] not in PRESETS:
        raise ConfigError(f"--preset must be one of {list(PRESETS)}, got {args['preset']!r}")
    preset = dict(PRESETS[args['preset']])
    if args['seeds']:
        preset['seeds'] = [int(s) for s in str(args['seeds']).split(',')]
    results = args['results'] or results_folder(args['preset'], args['data_seed'], args['seeds'] and preset['seeds'])
    out = args['out'] or os.path.join('out', 'study', os.path.basename(results.rstrip('/')))
    runs_dir = os.path.join(results, 'runs')
    check_runs(load_runs(runs_dir), preset, out, args['data_seed'])
    runtime = None
    if not args['report']:
        runtime = run_protocol(preset, out, runs_dir, args['data_seed'], args['jobs'], args['threads'])
    text = write_report(preset, args['preset'], load_runs(runs_dir), results, args['data_seed'], runtime)
    print(text)


if __name__ == '__main__':
    cli(main, sys.argv[1:], __doc__, f"Flags (--key=value) and their defaults: {FLAGS}")
