"""Progress for long steps: a line now and then while a call that reports nothing itself is running."""

from __future__ import annotations

import contextlib
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
