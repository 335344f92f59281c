"""Run what `moetrt build` wrote: `load(path)` → an Engine (.plan) or a Session (.onnx), same call signature.

`loading` finds and opens artifacts, `running` makes feeds and timed runs; `engine`, `session` and `manifest`
are imported where they are needed, so importing this package stays cheap.
"""

from moetrt.runtime.loading import load, resolve_artifact
from moetrt.runtime.running import check_run_request, feed_shapes, random_feeds, run_timed, vocab_sizes

__all__ = [
    "check_run_request",
    "feed_shapes",
    "load",
    "random_feeds",
    "resolve_artifact",
    "run_timed",
    "vocab_sizes",
]
