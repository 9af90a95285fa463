"""
Progress of a long loop as people expect it: `N/M`, time elapsed, time left (ETA).

    progress = Progress(total)
    for i in range(total):
        ...
        if progress.due():                       # every few seconds, never in between
            log(f"scoring {progress.line(i + 1)}")
"""

import time


def hms(seconds):
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    def __init__(self, total, every=5.0, done=0):
        """`total` steps (None if unknown), of which `done` were done before (a resumed run): the ETA
        counts this session's pace."""
        self.total, self.every, self.start = total, every, done
        self.t0 = self.last = time.time()

    def elapsed(self):
        return time.time() - self.t0

    def due(self):
        """True at most once every `every` seconds (a loop that ends sooner prints nothing)."""
        if time.time() - self.last < self.every:
            return False
        self.last = time.time()
        return True

    def line(self, done):
        elapsed = self.elapsed()
        if self.total is None:                   # a stream of unknown length
            return f"{done}, {hms(elapsed)} elapsed"
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = hms((self.total - done) / rate) if rate > 0 else '?'
        return f"{done}/{self.total}, {hms(elapsed)} elapsed, ETA {eta}"
