"""The tuner's routing rounds: router and top-k candidates, scored by their own launches, and --rounds."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from click.testing import CliRunner

from moetrt.cli import main
from moetrt.core.errors import MoetrtError
from moetrt.kernels import configs, plan
from moetrt.op.spec import MoEAttributes
from moetrt.tune import tuner

SMALL = MoEAttributes(12, 3, 64, 48, norm_topk_prob=True, shared_intermediate_size=32, has_shared_gate=True)
FEW_EXPERTS = MoEAttributes(8, 2, 64, 48)


@pytest.fixture
def table_dir(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The config table read from (and written to) tmp_path, its cache cleared before and after the test."""
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._load_table.cache_clear()
    yield tmp_path
    configs._load_table.cache_clear()


def test_prefill_router_candidates_split_h_and_fit_the_experts() -> None:
    base = configs.default_config(FEW_EXPERTS, "bfloat16", None)
    cands = configs.router_candidates(FEW_EXPERTS, base, "bfloat16", None)
    assert cands[0] == base
    routers = [c["router"] for c in cands[1:]]
    assert {r["SPLIT"] for r in routers} == set(configs.PREFILL_ROUTER_SPLITS)
    # 8 experts: no tile wider than the 16-column minimum (wider ones would multiply padding)
    assert {r["BE"] for r in routers} == {16}
    assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)  # no duplicates
    # every candidate changes the router only
    for cand in cands[1:]:
        assert {k: v for k, v in cand.items() if k != "router"} == {
            k: v for k, v in base.items() if k != "router"
        }
    # decode keeps its neighbourhood of the base split; fp32 prefill splits at most in two
    dec = configs.default_config(SMALL, "bfloat16", 16)
    split = dec["router"]["SPLIT"]
    assert {c["router"]["SPLIT"] for c in configs.router_candidates(SMALL, dec, "bfloat16", 16)} == {
        split,
        max(1, split // 2),
        split * 2,
    }
    fp32 = configs.default_config(SMALL, "float32", None)
    assert {c["router"]["SPLIT"] for c in configs.router_candidates(SMALL, fp32, "float32", None)} == {1, 2}


def test_router_candidates_try_the_shared_gate_in_both_forms() -> None:
    """With a shared gate every router candidate is tried with the gate summed in the logits programs (the
    default: no key) and in a column of its own (`GATE_COL` 1), base first as it is; without one, never."""
    for bound in (None, 16):
        base = configs.default_config(SMALL, "bfloat16", bound)
        cands = configs.router_candidates(SMALL, base, "bfloat16", bound)
        assert cands[0] == base and "GATE_COL" not in base["router"]
        inline = [c for c in cands if "GATE_COL" not in c["router"]]
        column = [c for c in cands if c["router"].get("GATE_COL") == 1]
        assert len(inline) == len(column) and len(inline) + len(column) == len(cands)
        assert [{**c["router"], "GATE_COL": 1} for c in inline] == [c["router"] for c in column]
        assert plan.shared_gate_column(SMALL, column[0]) == 1 and plan.shared_gate_column(SMALL, base) == 0
    base = configs.default_config(FEW_EXPERTS, "bfloat16", None)
    assert all(
        "GATE_COL" not in c["router"] for c in configs.router_candidates(FEW_EXPERTS, base, "bfloat16", None)
    )
    gated = copy.deepcopy(base)
    gated["router"]["GATE_COL"] = 1
    assert plan.shared_gate_column(FEW_EXPERTS, gated) == 0  # no shared gate: no column


def test_topk_candidates_stay_in_registers() -> None:
    many = dataclasses.replace(SMALL, num_experts=512, top_k=10)
    base = configs.default_config(many, "bfloat16", None)
    base["topk"]["RT"] = 16  # 16 x 512 keys: at the register limit, so no larger tile is tried
    cands = configs.topk_candidates(many, base)
    assert cands[0] == base
    assert max(c["topk"]["RT"] for c in cands) == 16
    assert {c["topk"]["RT"] for c in cands} == {1, 8, 16}  # one token per program always tried
    # 8 x 512 keys: too many for one warp; one token's 512 keys fit in one
    assert {c["topk"]["num_warps"] for c in cands[1:] if c["topk"]["RT"] > 1} == {2, 4, 8}
    assert {c["topk"]["num_warps"] for c in cands if c["topk"]["RT"] == 1} == {1, 2, 4, 8}
    for cand in cands[1:]:
        assert {k: v for k, v in cand.items() if k != "topk"} == {
            k: v for k, v in base.items() if k != "topk"
        }
    # smaller tiles (decode's, or fewer experts) are tried in one warp too
    dec = configs.default_config(many, "bfloat16", 16)
    one_warp = [c["topk"]["RT"] for c in configs.topk_candidates(many, dec) if c["topk"]["num_warps"] == 1]
    assert one_warp and all(rt * 512 <= configs.TOPK_ONE_WARP_MAX_ELEMENTS for rt in one_warp)
    few = configs.default_config(FEW_EXPERTS, "bfloat16", None)
    assert 1 in {c["topk"]["num_warps"] for c in configs.topk_candidates(FEW_EXPERTS, few)}


def test_topk_round_tries_routing_in_the_router_where_it_applies() -> None:
    """Decode buckets whose slots fit one program's registers try the router kernel routing (no top-k launch),
    and a base that routes there tries the top-k launch back; prefill and wide buckets never see it."""
    many = dataclasses.replace(SMALL, num_experts=512, top_k=10)
    one = configs.default_config(many, "bfloat16", 1)
    one["gemv"]["enabled"] = 0
    cands = configs.topk_candidates(many, one, 1)
    switched = [c for c in cands if c["topk"].get("in_router")]
    assert len(switched) == 1 and plan.routes_in_router(many, switched[0], 1)
    assert switched[0]["topk"] == {**one["topk"], "in_router": 1}
    back = configs.topk_candidates(many, switched[0], 1)
    assert back[0] is switched[0] and [c for c in back[1:] if c["topk"].get("in_router")] == []
    assert one in back  # the top-k launch with base's tiles
    # 16 tokens x top-10: past what one program sorts; prefill never
    sixteen = configs.default_config(many, "bfloat16", 16)
    assert not any(c["topk"].get("in_router") for c in configs.topk_candidates(many, sixteen, 16))
    prefill = configs.default_config(many, "bfloat16", None)
    assert not any(c["topk"].get("in_router") for c in configs.topk_candidates(many, prefill, None))


def test_routing_rounds_are_scored_by_the_routing_launches(table_dir) -> None:  # type: ignore[no-untyped-def]
    """With --rounds router,topk the GEMM tiles stay the table's, the candidates are judged by time_routing
    (not the call's time, which would hide them in its noise), and the entry records the call's time."""
    table_entry = copy.deepcopy(configs.default_config(SMALL, "bfloat16", None))
    table_entry["gate_up"].update({"BM": 32, "BN": 16})  # a tile the default config would not choose
    table = table_dir / "sm90.json"
    table.write_text(json.dumps({"entries": {configs.entry_key(SMALL, "bfloat16", None): table_entry}}))
    called: dict[str, int] = {"call": 0, "routing": 0}

    def call_time(cfg: dict, t: int) -> float:
        called["call"] += 1
        return 1000.0 + cfg["router"]["SPLIT"]  # a whole call: slower with more splits, by noise-sized steps

    def routing_time(cfg: dict, t: int) -> float:
        called["routing"] += 1
        r, k = cfg["router"], cfg["topk"]
        return 40.0 / r["SPLIT"] + r["BT"] / 64 + abs(k["num_warps"] - 2)

    best = tuner.tune(
        SMALL,
        "bfloat16",
        90,
        call_time,
        tokens=(600,),
        out_path=table,
        time_routing=routing_time,
        rounds=("router", "topk"),
    )
    entry = best[configs.entry_key(SMALL, "bfloat16", None)]
    assert entry["router"]["SPLIT"] == 8 and entry["router"]["BT"] == 16
    assert entry["topk"]["num_warps"] == 2
    assert (entry["gate_up"]["BM"], entry["gate_up"]["BN"]) == (32, 16)  # the table's tiles, untouched
    assert called["call"] == 1 and called["routing"] > 10  # the call timed once, for the entry's time
    assert entry["us"] == 1008.0
    assert (
        json.loads(table.read_text())["entries"][configs.entry_key(SMALL, "bfloat16", None)]["us"] == 1008.0
    )


def test_decode_routing_rounds_are_scored_by_the_call(table_dir) -> None:  # type: ignore[no-untyped-def]
    """In a decode bucket the router and top-k rounds are judged by the whole call, which sees how the routing
    launches shape the expert kernels' time under PDL; their own time would pick the other top-k."""
    called: dict[str, int] = {"call": 0, "routing": 0}

    def call_time(cfg: dict, t: int) -> float:
        called["call"] += 1
        return 100.0 + 10.0 * cfg["topk"]["RT"]  # one token per top-k program: the fastest call

    def routing_time(cfg: dict, t: int) -> float:
        called["routing"] += 1
        return 10.0 - cfg["topk"]["RT"]  # alone, more tokens per program looks faster

    best = tuner.tune(
        SMALL,
        "bfloat16",
        90,
        call_time,
        tokens=(8,),
        out_path=table_dir / "sm90.json",
        time_routing=routing_time,
        rounds=("router", "topk"),
    )
    assert best[configs.entry_key(SMALL, "bfloat16", 16)]["topk"]["RT"] == 1
    assert called["routing"] == 0 and called["call"] > 2


def test_bad_rounds_are_refused() -> None:
    with pytest.raises(MoetrtError, match="unknown tuning round"):
        tuner.rounds_to_run(SMALL, ["router", "speed"])
    with pytest.raises(MoetrtError, match="unknown tuning round"):
        tuner.rounds_to_run(SMALL, [])
    int4 = dataclasses.replace(SMALL, weight_format="int4", weight_block=16)
    with pytest.raises(MoetrtError, match="quantized entry has no router"):
        tuner.rounds_to_run(int4, ["tiles", "router"])
    assert tuner.rounds_to_run(int4, ["tiles"]) == ("tiles",)
    assert tuner.rounds_to_run(SMALL, ["topk", "router"]) == ("router", "topk")  # always in ROUNDS order
    assert tuner.rounds_to_run(SMALL, None) == tuner.ROUNDS
    # the CLI says so in one line before it looks for a GPU
    result = CliRunner().invoke(main, ["tune", "--preset", "qwen3_30b", "--rounds", "router,speed"])
    assert result.exit_code != 0
    assert "unknown tuning round(s) speed" in result.output
    assert "CUDA" not in result.output and "GPU" not in result.output.split("speed")[0]


def _ship_two_warp_entry(table_dir) -> str:  # type: ignore[no-untyped-def]
    """A table in table_dir whose SMALL prefill entry has 2-warp gate_up tiles (no search candidate has 2 warps,
    so a timer can tell the entry apart); returns its key."""
    shipped = copy.deepcopy(configs.default_config(SMALL, "bfloat16", None))
    shipped["gate_up"].update({"BM": 32, "BN": 16, "num_warps": 2})
    key = configs.entry_key(SMALL, "bfloat16", None)
    (table_dir / "sm90.json").write_text(json.dumps({"entries": {key: shipped}}))
    configs._load_table.cache_clear()
    return key


def test_a_search_from_the_defaults_keeps_a_faster_table_entry(table_dir) -> None:  # type: ignore[no-untyped-def]
    """The full search starts from the default config; where the table's entry is faster in the same run, the
    entry stays (a slower run must not overwrite it), and where it is slower this run's best replaces it."""
    key = _ship_two_warp_entry(table_dir)
    logged: list[str] = []

    def shipped_fastest(cfg: dict, t: int) -> float:
        return 50.0 if cfg["gate_up"]["num_warps"] == 2 else 100.0 - cfg["gate_up"]["BN"] / 64

    def shipped_slowest(cfg: dict, t: int) -> float:
        return 500.0 if cfg["gate_up"]["num_warps"] == 2 else 100.0 - cfg["gate_up"]["BN"] / 64

    out = table_dir / "out.json"
    best = tuner.tune(SMALL, "bfloat16", 90, shipped_fastest, tokens=(600,), out_path=out, log=logged.append)
    assert best[key]["gate_up"]["num_warps"] == 2 and best[key]["us"] == 50.0
    assert any("kept the table's entry (50.0 us)" in line for line in logged)
    best = tuner.tune(SMALL, "bfloat16", 90, shipped_slowest, tokens=(600,), out_path=out)
    assert best[key]["gate_up"]["num_warps"] != 2 and best[key]["us"] < 100.0


def test_a_round_keeps_its_first_config_unless_another_is_faster_by_the_margin(table_dir) -> None:  # type: ignore[no-untyped-def]
    """A re-tune starts each round from the table's entry; a candidate 1 % faster is within the run-to-run
    spread (tuner.KEEP_MARGIN) and leaves the entry as it is, one 5 % faster replaces it."""
    key = _ship_two_warp_entry(table_dir)

    def timer(gain: float):  # type: ignore[no-untyped-def]
        def time_config(cfg: dict, t: int) -> float:
            if cfg["gate_up"]["num_warps"] == 2:
                return 100.0
            return 100.0 * (1 - gain) + cfg["gate_up"]["BN"] / 1e4  # one other candidate is the fastest

        return time_config

    assert 0.01 < tuner.KEEP_MARGIN < 0.05
    logged: list[str] = []
    out = table_dir / "out.json"
    kept = tuner.tune(
        SMALL,
        "bfloat16",
        90,
        timer(0.01),
        tokens=(600,),
        out_path=out,
        rounds=("tiles",),
        log=logged.append,
    )
    assert kept[key]["gate_up"]["num_warps"] == 2 and kept[key]["us"] == 100.0
    assert any("kept the round's first config" in line for line in logged)
    assert any(line.startswith("  fastest: #") for line in logged)
    every = [
        line for line in logged if line.startswith("  all (us): ")
    ]  # each candidate's time, in order tried
    assert every and every[0].split()[2:4] == ["#0", "100.0"]
    summary = next(line for line in logged if "[tiles]: best" in line)  # "... best X us of N (first ..."
    assert len(every[0].split()[2:]) == 2 * int(summary.split(" of ")[1].split()[0])
    taken = tuner.tune(SMALL, "bfloat16", 90, timer(0.05), tokens=(600,), out_path=out, rounds=("tiles",))
    assert taken[key]["gate_up"]["num_warps"] != 2 and taken[key]["us"] < 96.0


def test_staged_call_allocates_the_plans_buffers_and_enqueues_ranges() -> None:
    """`tuner.staged_call` (profile_stages and bench/stage_times.py time through it): outputs, workspace and
    pointers for the launcher's plan at the inputs' token count, and launch ranges passed on to the launcher.
    The launcher here is the Python planner behind the launcher's interface (the real one needs a GPU)."""
    import torch

    from moetrt.kernels import plan
    from moetrt.op.reference import random_inputs

    attrs = dataclasses.replace(SMALL, output_router_logits=True)
    cfg = configs.default_config(attrs, "float32", 16)
    variants = plan.bucket_variants(attrs, "float32", 16, cfg)

    class PlannedLauncher:
        def __init__(self) -> None:
            self.enqueued: list[tuple] = []

        def launch_plan(self, t: int) -> tuple[list, dict]:
            ops = plan.launch_sequence(attrs, "float32", t, variants, cfg, 16)
            return ops, plan.workspace_layout(attrs, "float32", t, cfg, 16)

        def workspace_size(self, t: int) -> int:
            return self.launch_plan(t)[1]["total"].nbytes

        def enqueue_range(self, *args: object) -> None:
            self.enqueued.append(args)

    inputs = random_inputs(attrs, 5, dtype=torch.float32, seed=0)
    launcher = PlannedLauncher()
    call = tuner.staged_call(launcher, attrs, inputs)
    assert call.num_tokens == 5
    assert [op.stage for op in call.ops] == [op.stage for op in launcher.launch_plan(5)[0]]
    assert call.in_ptrs == [inputs[name].data_ptr() for name in attrs.present_inputs()]
    output, logits, workspace = call.buffers
    assert output.shape == (5, attrs.hidden_size) and logits.shape == (5, attrs.num_experts)
    assert output.dtype == logits.dtype == torch.float32
    assert call.out_ptrs == [output.data_ptr(), logits.data_ptr()]
    assert workspace.numel() == launcher.workspace_size(5) > 0 and call.workspace_ptr == workspace.data_ptr()
    call.enqueue(7, 1, 2)
    assert launcher.enqueued == [(5, call.in_ptrs, call.out_ptrs, call.workspace_ptr, 7, 1, 2)]


def test_draws_score_by_the_mean_and_bad_draws_are_refused() -> None:
    """A candidate's score over weight draws is the mean of its time on every draw (each draw runs: one that
    fails fails the candidate); the CLI refuses fewer than one draw in one line before it looks for a GPU."""
    seen: list[int] = []

    def on_draw(draw: int) -> float:
        seen.append(draw)
        return [10.0, 14.0, 30.0][draw]

    assert tuner.mean_over_draws(on_draw, 3) == pytest.approx(18.0)
    assert seen == [0, 1, 2]
    assert tuner.mean_over_draws(on_draw, 1) == 10.0

    def wrong_on_draw_one(draw: int) -> float:
        if draw == 1:
            raise MoetrtError("candidate is wrong (rel err 1e-1)", "")
        return 1.0

    with pytest.raises(MoetrtError, match="candidate is wrong"):
        tuner.mean_over_draws(wrong_on_draw_one, 2)
    result = CliRunner().invoke(main, ["tune", "--preset", "qwen3_30b", "--draws", "0"])
    assert result.exit_code != 0
    assert "--draws must be at least 1, got 0" in result.output
    assert "CUDA" not in result.output and "GPU" not in result.output


def test_pdl_round_tries_every_mode(table_dir) -> None:  # type: ignore[no-untyped-def]
    """The last round tries programmatic dependent launch off, with the next kernel launched at once, and with
    it launched as the programs exit (plan.PDL_MODES), the entry's own mode first, and keeps the fastest; a
    mode outside them is refused with the modes it takes."""
    base = configs.default_config(SMALL, "bfloat16", 16)
    cands = configs.pdl_candidates(base)
    assert cands[0] is base
    assert [plan.pdl_mode(c) for c in cands] == [0, 1, 2]
    assert [plan.pdl_mode(c) for c in configs.pdl_candidates({**base, "pdl": {"enabled": 2}})] == [2, 0, 1]
    seen: list[int] = []

    def call_time(cfg: dict, t: int) -> float:
        seen.append(plan.pdl_mode(cfg))
        return {0: 50.0, 1: 52.0, 2: 45.0}[plan.pdl_mode(cfg)]

    best = tuner.tune(
        SMALL, "bfloat16", 90, call_time, tokens=(1,), out_path=table_dir / "sm90.json", rounds=("pdl",)
    )
    assert sorted(set(seen)) == [0, 1, 2]
    assert best[configs.entry_key(SMALL, "bfloat16", 1)]["pdl"] == {"enabled": 2}
    with pytest.raises(ValueError, match=r"pdl\.enabled is 3; it takes 0, 1, 2"):
        plan.bucket_variants(SMALL, "bfloat16", 16, {**base, "pdl": {"enabled": 3}})


def test_each_bucket_is_written_once_tuned(table_dir) -> None:  # type: ignore[no-untyped-def]
    """A run stopped in its second bucket (Ctrl-C, a lost GPU) leaves the first bucket's entry in the table,
    next to the entries it had; the stopped bucket writes nothing."""
    table = table_dir / "sm90.json"
    other = {"E1_K1_H1_I1_S0/bfloat16/inf": {"us": 1.0}}
    table.write_text(json.dumps({"entries": other}))

    def call_time(cfg: dict, t: int) -> float:
        if t > 16:
            raise KeyboardInterrupt
        return 100.0 + cfg["gate_up"]["BN"]

    with pytest.raises(KeyboardInterrupt):
        tuner.tune(SMALL, "bfloat16", 90, call_time, tokens=(8, 600), out_path=table, rounds=("tiles",))
    entries = json.loads(table.read_text())["entries"]
    decode_key = configs.entry_key(SMALL, "bfloat16", 16)
    assert set(entries) == {*other, decode_key}
    assert entries[decode_key]["tokens"] == [8] and entries[decode_key]["us"] > 100.0


def test_candidates_the_plan_refuses_are_skipped_before_compiling(table_dir) -> None:  # type: ignore[no-untyped-def]
    """The tiles round of a 4-bit prefill bucket proposes weight tiles the plan refuses
    (plan.check_weights_first_rows); they are logged with the plan's reason and never reach `prepare`."""
    from moetrt.op.presets import like

    attrs = like("qwen3_next", 8, 2, 256, 256, weight_format="mxfp4", weight_block=32)
    logged: list[str] = []
    prepared: list[dict] = []

    def prepare(batch: list[tuple[dict, int]]) -> None:
        for cfg, _ in batch:
            plan.bucket_variants(attrs, "bfloat16", None, cfg)  # raises on a refused config
            prepared.append(cfg)

    tuned = tuner.tune(
        attrs,
        "bfloat16",
        90,
        lambda cfg, t: 100.0 + cfg["gate_up"]["BN"] / 1e3,
        tokens=(600,),
        out_path=table_dir / "out.json",
        rounds=("tiles",),
        prepare=prepare,
        log=logged.append,
    )
    refused = [line for line in logged if "refused by the plan" in line]
    assert refused and all("rows a warp group" in line for line in refused)
    assert prepared and len(tuned) == 1


def test_a_refused_table_entry_is_no_incumbent(table_dir) -> None:  # type: ignore[no-untyped-def]
    """Where the table's own entry is refused by the plan, the round's first planned candidate is not the
    incumbent: the fastest is taken even within tuner.KEEP_MARGIN of it."""
    from moetrt.op.presets import like

    attrs = like("qwen3_next", 8, 2, 256, 256, weight_format="mxfp4", weight_block=32)
    refused = copy.deepcopy(configs.default_config(attrs, "bfloat16", None, sm=90))
    refused["gate_up"].update({"BM": 128, "BN": 128, "BK": 64, "num_warps": 4})
    refused["dequant"]["per_weight"] = 1
    key = configs.entry_key(attrs, "bfloat16", None)
    (table_dir / "sm90.json").write_text(json.dumps({"entries": {key: refused}}))
    configs._load_table.cache_clear()
    with pytest.raises(ValueError, match="rows a warp group"):
        plan.bucket_variants(attrs, "bfloat16", None, configs.select_config(attrs, "bfloat16", 90, None))
    timed: list[dict] = []

    def later_is_a_little_faster(cfg: dict, t: int) -> float:  # all within the margin of the first
        timed.append(copy.deepcopy(cfg))
        return 100.0 - 0.01 * len(timed)

    logged: list[str] = []
    tuned = tuner.tune(
        attrs,
        "bfloat16",
        90,
        later_is_a_little_faster,
        tokens=(600,),
        out_path=table_dir / "out.json",
        rounds=("tiles",),
        log=logged.append,
    )
    assert not any("kept the round's first config" in line for line in logged)
    assert any("candidate 0 refused by the plan" in line for line in logged)
    assert tuned[key]["gate_up"] == {k: timed[-1]["gate_up"][k] for k in tuned[key]["gate_up"]}
