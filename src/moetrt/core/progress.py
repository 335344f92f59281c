"""What the user sees during long steps: a line now and then while a call that reports nothing itself is
running, and libraries' own log chatter held back."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def heartbeat(say: Callable[[str], None], what: str, every_s: float = 15.0) -> Iterator[None]:
    """Call `say(f"still {what} (N s)")` every `every_s` seconds until the block ends."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            say(f"still {what} ({time.perf_counter() - start:.0f} s)")

    thread = threading.Thread(target=beat, name="moetrt-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the named loggers (a library's notices about its own speed or fallbacks are not
    moetrt's progress); their levels are restored after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
