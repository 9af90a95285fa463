"""
Imported first by every entry point, before torch (which takes seconds to load): from that moment
SIGTERM and SIGINT (Ctrl-C) end the program with one line and exit status 3, never a traceback or a
silent death. runs.cli.cli then raises Interrupted instead (one line too), and a run's own handling
(runs.stopping.StopOnSignal) takes over inside it. A raised Interrupted that Python cannot pass on
(the signal landed inside a weakref callback or a __del__) ends the program at once too. Only for a
script of the project's top folder run as the program: a program that imports the project (pytest)
keeps its own handling.
"""

import os
import signal
import sys
import threading

from runs.errors import Interrupted, print_error

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop_while_starting(signum, frame):
    """Ends the program at once: an exception raised inside an import can be caught there by the library
    being loaded (some catch everything) and leave it half loaded. Every file is written atomically."""
    end_now(f"stopped by {signal.Signals(signum).name} while starting up or shutting down (no file is left "
            f"half-written)")


def stop_where_unraisable(info):
    """sys.unraisablehook: Python reports an exception raised inside a weakref callback or a __del__ as
    "Exception ignored" and goes on, so a signal's Interrupted landing there would be lost and the run
    would carry on. Such a stop ends the program at once, in one line; any other exception is reported
    as Python does."""
    if not isinstance(info.exc_value, Interrupted):
        return sys.__unraisablehook__(info)
    end_now(str(info.exc_value))


def end_now(message):
    """One line, then the program ends at once with Interrupted's status (no clean-up runs)."""
    print_error(message)
    sys.stderr.flush()
    os._exit(Interrupted.status)


def is_entry_point():
    main = getattr(sys.modules.get('__main__'), '__file__', None)
    return bool(main) and os.path.dirname(os.path.abspath(main)) == ROOT


if is_entry_point() and threading.current_thread() is threading.main_thread():
    for s in SIGNALS:
        signal.signal(s, stop_while_starting)
    sys.unraisablehook = stop_where_unraisable
