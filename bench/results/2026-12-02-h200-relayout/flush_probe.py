"""Is the T = 1 difference between the old and new parity timings the L2 flush? Same launcher call, same
inputs, timed with the one timer (`moetrt.tune.timing.time_calls` over a CUDA-graph replay) under the two
flushes: the shared L2Flusher (read-modify-write of 4x L2) and the old parity script's 256 MB zero-fill,
alternating, three times each.

    PYTHONPATH=src python3 bench/results/2026-12-02-h200-relayout/flush_probe.py
"""

from __future__ import annotations

import torch

from moetrt.core.devices import current_sm
from moetrt.kernels.aot import compile_kernels
from moetrt.kernels.torch_ops import moe_forward
from moetrt.op.presets import PRESETS
from moetrt.tune import timing
from moetrt.tune.gpu_workload import gpu_random_inputs

device = torch.device("cuda")
zero_buffer = torch.empty(256 << 20, dtype=torch.uint8, device=device)
flushes = {"L2Flusher (add_, 4x L2)": timing.L2Flusher(device), "zero_ 256 MB": zero_buffer.zero_}
for shape, tokens in (("mixtral", 1), ("deepseek_v3", 1), ("gpt_oss_20b", 8), ("qwen3_next", 1)):
    attrs = PRESETS[shape]
    bundle = compile_kernels(attrs, "bf16", current_sm(), workers=16)
    inputs = gpu_random_inputs(attrs, tokens, torch.bfloat16, seed=100 + tokens)
    call = timing.CapturedCall(lambda inputs=inputs, attrs=attrs, bundle=bundle: moe_forward(inputs, attrs, bundle), device)
    for round_ in range(3):
        for name, flush in flushes.items():
            median = timing.time_calls([call], device, 20, flush).median_us
            print(f"{shape:12} T={tokens} round {round_} {name:24} {median:8.1f} us", flush=True)
    del inputs, call
    torch.cuda.empty_cache()
