"""
Imported first by every entry point, before torch (which takes seconds to load): from that moment
SIGTERM and SIGINT (Ctrl-C) end the program with one line and exit status 3, never a traceback or a
silent death. runs.cli.cli then raises Interrupted instead (one line too), and a run's own handling
(runs.stopping.StopOnSignal) takes over inside it. Only for a script of the project's top folder run
as the program: a program that imports the project (pytest) keeps its own handling.
"""

import os
import signal
import sys
import threading

from runs.errors import print_error

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop_while_starting(signum, frame):
    """Ends the program at once: an exception raised inside an import can be caught there by the library
    being loaded (some catch everything) and leave it half loaded. Every file is written atomically."""
    print_error(f"stopped by {signal.Signals(signum).name} while starting up or shutting down (no file is left "
                f"half-written)")
    sys.stderr.flush()
    os._exit(3)                                  # runs.errors.Interrupted.status


def is_entry_point():
    main = getattr(sys.modules.get('__main__'), '__file__', None)
    return bool(main) and os.path.dirname(os.path.abspath(main)) == ROOT


if is_entry_point() and threading.current_thread() is threading.main_thread():
    for s in SIGNALS:
        signal.signal(s, stop_while_starting)
