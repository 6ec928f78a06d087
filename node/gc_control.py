"""How the node uses Python's cycle collector, in one place.

The replicated state is a large graph of long-lived objects (100,000 live processes are a few
million objects). A full collection walks all of them while holding the GIL, which is an
event-loop stall of hundreds of milliseconds, and the default thresholds run one after every
few hundred thousand allocations. So:

* ``tune()`` at start: collections are rarer (the state's objects rarely form garbage cycles;
  reference counting frees them).
* ``bulk_load()`` around building the state from a snapshot (a restart, an install): no
  collection while it is built (each would walk all of it), and then everything moves to the
  permanent generation, which no collection walks. (Only pausing would not do: the first
  collection after it would walk every object made meanwhile, a 200 ms stall at 10,000
  processes.) ``freeze()`` does the same for what exists once the node has started.
* ``pause()``/``resume()`` while a snapshot's child process lives: a collection in the parent
  would write to the header of every object it walks, and the kernel would copy every page
  the child still shares. Pauses nest, from any thread.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (50_000, 20, 100)

_lock = threading.Lock()
_pauses = 0


def tune() -> None:
    gc.set_threshold(*THRESHOLDS)


def freeze() -> None:
    gc.freeze()


def pause() -> None:
    global _pauses
    with _lock:
        _pauses += 1
        gc.disable()


def resume() -> None:
    global _pauses
    with _lock:
        _pauses = max(0, _pauses - 1)
        if _pauses == 0:
            gc.enable()


@contextmanager
def bulk_load() -> Iterator[None]:
    pause()
    try:
        yield
        gc.freeze()
    finally:
        resume()
