"""Launch the MoE cubins through the native launcher (`kernels/native.py`): the code path the TensorRT plugin
library and C++ applications run too.

No torch and no Triton here: cubins come from a `KernelBundle`, pointers are raw CUDA device pointers, the
stream is a raw CUstream handle. The plan (grids, arguments, workspace layout) is the native library's; it is
tested against `plan.py` on the CPU for every bucket.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from moetrt.core.errors import MoetrtError
from moetrt.kernels import plan
from moetrt.kernels.aot import KernelBundle
from moetrt.kernels.native import NativeBundle, NativeLauncher
from moetrt.op.spec import MoEAttributes


def plan_from_native(described: dict) -> tuple[list[plan.Launch], dict[str, plan.Region]]:
    """The native planner's description (NativeBundle.plan) in plan.py's terms."""
    ops = [
        plan.Launch(
            op["stage"],
            op["key"],
            (op["grid"][0], op["grid"][1], op["grid"][2]),
            tuple((src, ref) for src, ref in op["args"]),
            op["pdl"],
        )
        for op in described["launches"]
    ]
    layout = {name: plan.Region(offset, nbytes) for name, (offset, nbytes) in described["layout"].items()}
    return ops, layout


class MoELauncher:
    """Loads a bundle's cubins into the current CUDA context and enqueues the op on a stream."""

    def __init__(self, bundle: KernelBundle, attrs: MoEAttributes) -> None:
        if bundle.moe_attributes() != attrs:
            raise MoetrtError(
                "kernel bundle was compiled for other MoE attributes",
                "compile a bundle for these attributes (aot.compile_kernels)",
            )
        self.bundle = bundle
        self.attrs = attrs
        self.native_bundle = NativeBundle(bundle.to_bytes())
        self._native = NativeLauncher(self.native_bundle)
        self._plans: OrderedDict[int, tuple[list[plan.Launch], dict[str, plan.Region]]] = OrderedDict()

    def workspace_size(self, num_tokens: int) -> int:
        """Bytes of device workspace `enqueue` needs for `num_tokens` tokens (256-byte aligned)."""
        if num_tokens <= 0:
            return 0
        return self.launch_plan(num_tokens)[1]["total"].nbytes  # cached: called before every enqueue

    def launch_plan(self, num_tokens: int) -> tuple[list[plan.Launch], dict[str, plan.Region]]:
        """The launches and workspace layout for `num_tokens` (cached per token count)."""
        cached = self._plans.get(num_tokens)
        if cached is None:
            cached = self._plans[num_tokens] = plan_from_native(self.native_bundle.plan(num_tokens))
            if len(self._plans) > 256:
                self._plans.popitem(last=False)
        return cached

    def enqueue(
        self,
        num_tokens: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
        stream: int,
    ) -> None:
        """Launch the op for `num_tokens` tokens on `stream` (asynchronous; nothing for 0 tokens)."""
        self._native.enqueue(num_tokens, input_ptrs, output_ptrs, workspace_ptr, stream)

    def enqueue_range(
        self,
        num_tokens: int,
        input_ptrs: Sequence[int],
        output_ptrs: Sequence[int],
        workspace_ptr: int,
        stream: int,
        first: int,
        count: int,
    ) -> None:
        """Launch `count` launches of the plan from `first` on (per-stage profiling)."""
        self._native.enqueue(num_tokens, input_ptrs, output_ptrs, workspace_ptr, stream, first, count)
