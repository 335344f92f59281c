"""The kernel-config tuner: time candidate configs per token bucket on the GPU at hand, write the best."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moetrt.core.devices import current_sm
from moetrt.core.dtypes import precision
from moetrt.core.errors import MoetrtError
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.kernels import plan
from moetrt.kernels.configs import (
    QUANTIZED_STAGES,
    candidate_configs,
    default_config,
    entry_key,
    pdl_candidates,
    persistent_candidates,
    router_candidates,
    select_config,
    tma_candidates,
    topk_candidates,
    write_table,
)
from moetrt.kernels.plan import BUCKETS
from moetrt.op.spec import MoEAttributes
from moetrt.tune.gpu_workload import gpu_quantized_inputs, gpu_random_inputs, gpu_reference
from moetrt.tune.timing import L2Flusher, time_graph

#: The stages a native entry holds (a quantized one: QUANTIZED_STAGES).
STAGES = ("router", "topk", "gate_up", "down", "fused", "pdl", "gemv", "routed")
#: A round keeps the config it started from (its first candidate: the table's entry, or the previous round's
#: choice) unless a candidate is faster by more than this share. Repeated timings of one config differ by
#: about this much on the H200 (bench/results/2026-12-04-h200-clean-flush, steps 6 and 9: 0.5-0.7 µs of a
#: 35 µs call), so a smaller win is noise, and taking it would only churn the table from one run to the next.
KEEP_MARGIN = 0.02
#: Tuning rounds in order; a quantized entry has the first only (its routing is the native entry's).
ROUNDS = ("tiles", "tma", "persist", "router", "topk", "pdl")
QUANTIZED_ROUNDS = ("tiles",)
#: The launches the router and top-k rounds change, and what `time_routing` sums.
ROUTING_STAGES = ("router", "topk")


def rounds_to_run(attrs: MoEAttributes, rounds: Iterable[str] | None) -> tuple[str, ...]:
    """The tuning rounds to run, in ROUNDS order: all of the op's (None) or the named ones, checked."""
    allowed = QUANTIZED_ROUNDS if attrs.is_quantized else ROUNDS
    if rounds is None:
        return allowed
    wanted = list(rounds)
    unknown = [r for r in wanted if r not in ROUNDS]
    if unknown or not wanted:
        raise MoetrtError(
            f"unknown tuning round(s) {', '.join(unknown) or '(none named)'}",
            f"name some of {', '.join(ROUNDS)}",
        )
    if not set(wanted) <= set(allowed):
        raise MoetrtError(
            f"a quantized entry has no {', '.join(r for r in wanted if r not in allowed)} round "
            "(its router, top-k and PDL are the native entry's)",
            "tune those on the native shape (without --weights), and --rounds tiles here",
        )
    return tuple(r for r in allowed if r in wanted)


def _better_of_shipped(
    attrs: MoEAttributes,
    dtype: str,
    sm: int,
    bound: int | None,
    counts: list[int],
    chosen: dict[str, Any],
    call_us: float,
    time_config: Callable[[dict[str, Any], int], float],
    log: Callable[[str], None],
) -> tuple[dict[str, Any], float]:
    """(config, µs) of the bucket to write: this run's best, or the table's entry where it has one and it is
    faster in this same run. A search from the default config need not pass through the shipped entry (tuned
    in another run, maybe from other candidates), and a slower run must not overwrite a faster entry."""
    shipped = select_config(attrs, dtype, sm, bound)
    if shipped in (chosen, default_config(attrs, dtype, bound)):
        return chosen, call_us
    try:
        shipped_us = sum(time_config(shipped, t) for t in counts)
    except Exception as err:  # an entry that no longer compiles or computes right is replaced
        log(f"  the table's entry failed: {err!r}")
        return chosen, call_us
    if shipped_us < call_us:
        log(
            f"{entry_key(attrs, dtype, bound)}: kept the table's entry ({shipped_us:.1f} us), faster than this "
            f"run's best ({call_us:.1f} us)"
        )
        return shipped, shipped_us
    return chosen, call_us


def _plannable(
    attrs: MoEAttributes,
    dtype: str,
    bound: int | None,
    cands: list[dict[str, Any]],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The candidates the plan accepts, in order; each refused one logged with the plan's reason (e.g.
    plan.check_weights_first_rows), before any is compiled."""
    kept = []
    for i, cfg in enumerate(cands):
        try:
            plan.bucket_variants(attrs, dtype, bound, cfg)
        except ValueError as err:
            log(f"  candidate {i} refused by the plan: {err}")
            continue
        kept.append(cfg)
    return kept


def tune(
    attrs: MoEAttributes,
    dtype: str,
    sm: int,
    time_config: Callable[[dict[str, Any], int], float],
    tokens: Iterable[int] = (1, 16, 64, 512, 4096),
    out_path: str | os.PathLike[str] | None = None,
    prepare: Callable[[list[tuple[dict[str, Any], int]]], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
    time_routing: Callable[[dict[str, Any], int], float] | None = None,
    rounds: Iterable[str] | None = None,
    sm_count: int = 0,
) -> dict[str, Any]:
    """Time candidates per bucket with `time_config(cfg, num_tokens) -> µs`; write each bucket's best to the
    table as soon as it is chosen.

    Rounds per token count (ROUNDS): the GEMM tiles (and the fused decode kernel), then (SM90+, native 16-bit
    experts) those tiles loaded by TMA, then (prefill buckets that load by TMA, on a GPU of `sm_count` SMs)
    persistent grouped GEMMs of one program per SM, then the router's block shapes and splits of H, then the top-k's, then
    (SM90+) programmatic dependent launch on or off. Quantized experts: the expert GEMM tiles only, around the
    config the table gives today (router, top-k and PDL are the native entry's: those kernels do not read the
    experts), and only those tiles are written.
    `time_routing(cfg, num_tokens) -> µs`, if given, scores the router and top-k rounds of prefill buckets by
    those two launches alone: there they are a few per cent of the call, within its run-to-run noise, so a
    whole-call timer picks among them by noise. Decode buckets score them by the call: the routing is a large
    share of a short call, and under programmatic dependent launch its launches' shape changes the expert
    kernels' time too (on the H200, one token per top-k program took Qwen3-Next's T = 8 call from 140 to
    127 µs, which the two launches' own time did not pick).
    `rounds`: a subset of ROUNDS to run, starting from the table's config of each bucket instead of the
    default config (e.g. ("router", "topk") re-tunes the routing launches of the shipped table). A search
    from the default config ends by timing the table's entry too and keeps it where it is faster.
    `prepare(list of (cfg, num_tokens))`, if given, sees each round's candidates first (to compile them
    in parallel). A bucket is scored by the sum of its times over the `tokens` it serves (e.g. 1 and 8
    for the <= 16 bucket), so one fast token count cannot pick a config that is slow at another.
    """
    to_run = rounds_to_run(attrs, rounds)
    per_bucket: dict[int | None, list[int]] = {}
    for t in tokens:
        per_bucket.setdefault(next(b for b in BUCKETS if b is None or t <= b), []).append(t)
    best: dict[str, Any] = {}
    for bound, counts in per_bucket.items():
        if attrs.is_quantized or rounds is not None:
            chosen = select_config(attrs, dtype, sm, bound)
        else:
            chosen = default_config(attrs, dtype, bound)
        call_us: float | None = None  # the chosen config's whole-call time, once a round has measured it
        for round_name in to_run:
            if round_name == "tiles":
                cands = candidate_configs(attrs, dtype, bound, base=chosen)
            elif round_name == "tma":  # SM90+: the best tiles with their loads by TMA
                tma = tma_candidates(attrs, dtype, bound, chosen) if sm >= 90 else []
                if not tma:
                    continue
                cands = [chosen, *tma]
            elif round_name == "persist":  # SM90+ prefill by TMA: one program per SM, looping over tiles
                persist = persistent_candidates(attrs, dtype, bound, chosen, sm_count) if sm >= 90 else []
                if not persist:
                    continue
                cands = [chosen, *persist]
            elif round_name == "router":
                cands = router_candidates(attrs, chosen, dtype, bound)
            elif round_name == "topk":
                cands = topk_candidates(attrs, chosen, bound)
            elif sm >= 90:  # programmatic dependent launch: off, next kernel at once, or as programs exit
                cands = pdl_candidates(chosen)
            else:
                continue
            planned = _plannable(attrs, dtype, bound, cands, log)
            # the round's first config is the incumbent (the table's, or the last round's best) only if planned
            has_incumbent = bool(planned) and planned[0] is cands[0]
            cands = planned
            by_own_time = round_name in ROUTING_STAGES and not plan.is_decode(bound)
            timer = time_routing if time_routing is not None and by_own_time else time_config
            by_routing = timer is not time_config
            if prepare is not None:
                prepare([(cfg, counts[0]) for cfg in cands])
            timings = []
            for i, cfg in enumerate(cands):
                try:
                    timings.append((sum(timer(cfg, t) for t in counts), i, cfg))
                except Exception as err:  # a candidate that does not compile, fit or compute right is skipped
                    log(f"  candidate {i} failed: {err!r}")
            if not timings:
                raise MoetrtError(
                    f"no candidate config ran for {counts} tokens", "check the GPU and the shape"
                )
            ranked = sorted(timings, key=lambda x: x[:2])
            us, _, chosen = ranked[0]
            first_us, first_index, first_cfg = timings[0]
            if (
                has_incumbent
                and first_index == 0
                and chosen is not first_cfg
                and us > first_us * (1 - KEEP_MARGIN)
            ):
                log(
                    f"  kept the round's first config: the best, {us:.1f} us, is within "
                    f"{KEEP_MARGIN:.0%} of its {first_us:.1f} us"
                )
                us, chosen = first_us, first_cfg
            log("  fastest: " + ", ".join(f"#{i} {t:.1f} us" for t, i, _ in ranked[:3]))
            # every candidate, in the order tried, so a log shows what each switch cost (not only the winners)
            log("  all (us): " + " ".join(f"#{i} {t:.1f}" for t, i, _ in sorted(timings, key=lambda x: x[1])))
            call_us = None if by_routing else us
            by_path: dict[str, float] = {}
            for t_us, _, cfg in timings:
                path = plan.decode_path(cfg, bound)
                by_path[path] = min(by_path.get(path, float("inf")), t_us)
            if len(by_path) > 1:
                log("  best per path: " + ", ".join(f"{p} {t:.1f} us" for p, t in sorted(by_path.items())))
            scored = "router + top-k launches" if by_routing else "call"
            log(
                f"{entry_key(attrs, dtype, bound)} T={counts} [{round_name}]: best {us:.1f} us of {len(timings)} "
                f"(first {timings[0][0]:.1f} us, {scored}); fused={chosen['fused']['enabled']} "
                f"pdl={chosen['pdl']['enabled']} gemv={chosen['gemv']['enabled']} routed={chosen['routed']['enabled']}"
            )
        if call_us is None:  # the last round scored the routing launches only: time the whole call once
            call_us = sum(time_config(chosen, t) for t in counts)
        # a search from the default config may not have met the shipped entry, which may be faster
        if rounds is None and not attrs.is_quantized:
            chosen, call_us = _better_of_shipped(
                attrs, dtype, sm, bound, counts, chosen, call_us, time_config, log
            )
        stages = QUANTIZED_STAGES if attrs.is_quantized else STAGES
        key = entry_key(attrs, dtype, bound)
        best[key] = {
            **{stage: chosen[stage] for stage in stages},
            "us": round(call_us, 2),
            "tokens": counts,
        }
        # each bucket's entry is written once it is tuned, so a long run stopped later keeps the finished ones
        write_table({key: best[key]}, sm, out_path)
    return best


# --- on a GPU (torch imported inside): inputs, timing, per-stage profile, the tuning driver ---------------


def profile_stages(
    bundle: Any, attrs: MoEAttributes, inputs: dict[str, Any], iters: int = 20
) -> dict[str, float]:
    """Median GPU µs of each op of the launch sequence (memset, router, ...), L2 flushed before each run.

    A sleep kernel first lets the host enqueue the whole sequence ahead of the GPU, so the event gaps
    measure the kernels, not Python's launch cost.
    """
    import statistics

    import torch

    from moetrt.kernels.launcher import MoELauncher

    call = staged_call(MoELauncher(bundle, attrs), attrs, inputs)
    flush = L2Flusher(torch.device("cuda"))
    stream = torch.cuda.current_stream().cuda_stream
    names = [op.stage for op in call.ops]
    samples: list[list[float]] = [[] for _ in call.ops]
    for _ in range(iters + 2):
        flush()
        torch.cuda._sleep(2_000_000)
        events = [torch.cuda.Event(enable_timing=True)]
        events[0].record()
        for i in range(len(call.ops)):
            call.enqueue(stream, i, 1)
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        torch.cuda.synchronize()
        for i in range(len(call.ops)):
            samples[i].append(events[i].elapsed_time(events[i + 1]) * 1e3)
    result: dict[str, float] = {}
    for name, times in zip(names, samples, strict=True):
        key = name if name not in result else f"{name}_{len(result)}"
        result[key] = statistics.median(times[2:])
    return result


@dataclass(frozen=True)
class StagedCall:
    """One call through a launcher with its outputs and workspace allocated, enqueued some of its launches at
    a time (`profile_stages`, bench/stage_times.py's prefixes)."""

    launcher: Any  # kernels.launcher.MoELauncher
    ops: list[plan.Launch]
    num_tokens: int
    in_ptrs: list[int]
    out_ptrs: list[int]
    workspace_ptr: int
    buffers: tuple[Any, ...]  # the outputs and the workspace the pointers point into, kept alive with them

    def enqueue(self, stream: int, first: int, count: int) -> None:
        """Enqueue `count` launches of the call from launch `first` on, on `stream`."""
        self.launcher.enqueue_range(
            self.num_tokens, self.in_ptrs, self.out_ptrs, self.workspace_ptr, stream, first, count
        )


def staged_call(launcher: Any, attrs: MoEAttributes, inputs: dict[str, Any]) -> StagedCall:
    """`launcher`'s call on `inputs` (its launch plan for their token count), with outputs and a workspace
    allocated on the inputs' device."""
    import torch

    hidden = inputs["hidden_states"]
    num_tokens = hidden.shape[0]
    ops, _ = launcher.launch_plan(num_tokens)
    outputs = [torch.empty(num_tokens, attrs.hidden_size, dtype=hidden.dtype, device=hidden.device)]
    if attrs.output_router_logits:
        outputs.append(torch.empty(num_tokens, attrs.num_experts, dtype=hidden.dtype, device=hidden.device))
    workspace = torch.empty(launcher.workspace_size(num_tokens), dtype=torch.uint8, device=hidden.device)
    return StagedCall(
        launcher=launcher,
        ops=ops,
        num_tokens=num_tokens,
        in_ptrs=[inputs[name].data_ptr() for name in attrs.present_inputs()],
        out_ptrs=[t.data_ptr() for t in outputs],
        workspace_ptr=workspace.data_ptr(),
        buffers=(*outputs, workspace),
    )


def tune_gpu(
    attrs: MoEAttributes,
    dtype: str,
    tokens: Iterable[int] = (1, 16, 64, 512, 4096),
    out_path: str | os.PathLike[str] | None = None,
    workers: int = 8,
    iters: int = 20,
    log: Callable[[str], None] = print,
    rounds: Iterable[str] | None = None,
    draws: int = 1,
) -> dict[str, Any]:
    """Tune the config table for this GPU's SM: compile every candidate, time it through the launcher (the
    routing rounds by their launches alone, `profile_stages`); `rounds` as in `tune`. `draws` > 1 times each
    candidate's call on that many random weight draws and scores it by their mean (each draw's inputs are
    checked against its own reference): at decode a call's time moves with the draw (which experts the tokens
    pick, where their rows lie: Qwen3-30B T = 8 took 125-133 µs over four draws on the H200), so a close
    decision on one draw can follow its luck. The routing launches' own time (prefill) uses the first draw.
    GPU memory holds every draw's weights."""
    import torch

    from moetrt.kernels import aot, plan
    from moetrt.kernels.torch_ops import moe_forward

    if not torch.cuda.is_available():
        raise MoetrtError("tuning needs a CUDA GPU", "run `moetrt tune` on the GPU the table is for")
    sm = current_sm()
    dtype = precision(dtype).kernel_name  # config tables and bundles key by the kernel name
    torch_dtype = precision(dtype).torch
    # quantized experts: the native weights quantized on the GPU, the reference on their dequantized values
    native_attrs = attrs.with_native_weights()
    if draws < 1:
        raise MoetrtError(f"draws must be at least 1, got {draws}", "e.g. --draws 4")
    weight_draws = [
        gpu_quantized_inputs(gpu_random_inputs(native_attrs, 1, torch_dtype, seed=1 + draw), attrs)
        for draw in range(draws)
    ]
    cache: dict[str, aot.CompiledKernel] = {}
    broken: set[str] = set()

    def bucket(t: int) -> int | None:
        return next(b for b in BUCKETS if b is None or t <= b)

    def prepare(cands: list[tuple[dict[str, Any], int]]) -> None:
        todo: dict[str, plan.Variant] = {}
        for cfg, t in cands:
            for v in plan.bucket_variants(attrs, dtype, bucket(t), cfg).values():
                if v.key not in cache and v.key not in broken:
                    todo[v.key] = v
        compiled, failed = aot.compile_variants(todo.values(), dtype, sm, workers)
        cache.update(compiled)
        for key, err in failed.items():
            broken.add(key)
            log(f"  variant {key} does not compile: {err!r}")

    references: dict[tuple[int, int], tuple[dict[str, Any], Any]] = {}

    def checked_bundle(cfg: dict[str, Any], t: int, draw: int = 0) -> tuple[Any, dict[str, Any]]:
        """The candidate's bundle and inputs, once its output at `t` tokens on weight draw `draw` matched the
        reference."""
        bound = bucket(t)
        keys = {v.key for v in plan.bucket_variants(attrs, dtype, bound, cfg).values()}
        if keys & broken:
            raise MoetrtError("a variant of this candidate does not compile", "")
        bundle = aot.compile_kernels(attrs, dtype, sm, buckets=(bound,), configs={bound: cfg}, cache=cache)
        if (draw, t) not in references:
            hidden = gpu_random_inputs(native_attrs, t, torch_dtype, seed=100 + t, names=["hidden_states"])
            weights, oracle_weights = weight_draws[draw]
            inputs, oracle = {**weights, **hidden}, {**oracle_weights, **hidden}
            references[(draw, t)] = (
                inputs,
                gpu_reference(oracle, native_attrs, attrs.fp8_activation_block).output,
            )
            # the first config timed on a freshly made input (weights drawn, oracle computed) ran 10-14 µs
            # slower at T = 8 than the same config timed after it: an untimed pass before any timer
            time_graph(lambda: moe_forward(inputs, attrs, bundle), repeats=iters)
        inputs, ref = references[(draw, t)]
        # a fast candidate must also be right: poisoned output, compared with the float32 reference
        out = {"output": torch.full((t, attrs.hidden_size), float("nan"), dtype=torch_dtype, device="cuda")}
        moe_forward(inputs, attrs, bundle, outputs=out)
        rel = relative_error(out["output"], ref)
        if not rel <= tolerance(dtype):
            raise MoetrtError(f"candidate is wrong (rel err {rel:.2e})", "")
        return bundle, inputs

    def time_config(cfg: dict[str, Any], t: int) -> float:
        def on_draw(draw: int) -> float:
            bundle, inputs = checked_bundle(cfg, t, draw)
            return time_graph(lambda: moe_forward(inputs, attrs, bundle), repeats=iters).median_us

        return mean_over_draws(on_draw, draws)

    def time_routing(cfg: dict[str, Any], t: int) -> float:
        bundle, inputs = checked_bundle(cfg, t)
        stages = profile_stages(bundle, attrs, inputs, iters)
        return sum(us for stage, us in stages.items() if stage in ROUTING_STAGES)

    return tune(
        attrs,
        dtype,
        sm,
        time_config,
        tokens,
        out_path,
        prepare=prepare,
        log=log,
        time_routing=time_routing,
        rounds=rounds,
        sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
    )


def mean_over_draws(time_on_draw: Callable[[int], float], draws: int) -> float:
    """A candidate's score over weight draws 0 .. draws - 1: the mean of its time on each (every draw runs, so
    a candidate wrong or failing on any draw fails, as on one)."""
    return sum(time_on_draw(draw) for draw in range(draws)) / draws
