"""Progress bars: tqdm's (``tqdm.auto``), made safe against a Ctrl-C at any moment.

tqdm's finaliser closes the bar, and closing reads attributes that ``__init__`` sets one
after another. A ``KeyboardInterrupt`` that lands inside ``__init__`` leaves a bar without
some of them, and when that bar is collected Python prints "Exception ignored in ...
Traceback ... AttributeError" under the command's one-line "interrupted" message (tqdm
issues #323 and #1668). Our bars skip the close of a bar that was never finished.
"""

from __future__ import annotations

import functools


@functools.cache
def _bar_class() -> type:
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def __del__(self):
            try:
                super().__del__()
            except AttributeError:  # __init__ cut short: nothing was drawn to close
                pass

    return Bar


def progress_bar(**kwargs):
    """A ``tqdm.auto.tqdm`` bar with these keyword arguments."""
    return _bar_class()(**kwargs)
