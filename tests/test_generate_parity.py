"""Generation through the fused artifact against transformers' own `generate`, for every demo family.

Each family is built once (`moetrt build`, fp32, TensorRT-RTX engine for rtx40: a real engine with the state
inputs and outputs and the prefill and decode profiles). Then greedy generation through the build's fused
model.onnx (onnxruntime, I/O binding, state kept between steps) must give transformers' token ids for 32 new
tokens, and every step's logits within the fp32 tolerance, for prompts of 1, 7 and 70 tokens (past
Qwen3-Next's 64-token chunk; past GPT-OSS's 16-token sliding window) at batch 1 and for two prompts of
different lengths in one batch (left-padded, as transformers pads them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetrt.build import build
from moetrt.build_request import BuildOptions
from moetrt.core.artifacts import MANIFEST_NAME, ONNX_NAME, PLAN_NAME
from moetrt.core.tolerances import relative_error, tolerance
from moetrt.export.demo_models import DEMO_FAMILIES, build_demo
from moetrt.runtime.generation import OrtDecoder, generate, left_padded
from moetrt.trt.targets import DimRange

NEW_TOKENS = 32
#: prompt lengths per case: three single prompts, then two batches of prompts of different lengths
CASES = [(1,), (7,), (70,), (7, 70), (1, 9)]


@pytest.fixture(scope="module", params=DEMO_FAMILIES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    family = request.param
    outdir = tmp_path_factory.mktemp(family) / "out"
    options = BuildOptions(
        target="rtx40",
        precision="fp32",
        engine_backend="tensorrt-rtx",
        parity=False,  # parity here is generation's, below
        tokens=DimRange(1, 16, 128),
        max_context=256,
    )
    build(f"demo:{family}", outdir, options)
    return family, outdir


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


def _transformers_generate(family: str, prompts: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = build_demo(family).module.model
    model.generation_config.eos_token_id = None  # 32 tokens, as our loop runs them
    model.generation_config.pad_token_id = 0
    ids, mask = left_padded(prompts)  # pad id 0, as set above
    longest = ids.shape[1]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, longest:], [step.float() for step in out.logits]


@pytest.mark.parametrize("lengths", CASES, ids=lambda c: "+".join(map(str, c)))
def test_greedy_generation_matches_transformers(built: tuple[str, Path], lengths: tuple[int, ...]) -> None:
    family, outdir = built
    manifest = json.loads((outdir / MANIFEST_NAME).read_text())
    from moetrt.runtime.decoder_io import state_from_manifest

    state = state_from_manifest(manifest)
    assert state is not None
    prompts = _prompts(lengths, seed=len(lengths) * 100 + sum(lengths))
    result = generate(OrtDecoder(outdir / ONNX_NAME, state), prompts, NEW_TOKENS, keep_logits=True)
    want_ids, want_logits = _transformers_generate(family, prompts)

    assert [len(ids) for ids in result.ids] == [NEW_TOKENS] * len(prompts)
    assert torch.equal(torch.tensor(result.ids), want_ids), (family, lengths)
    bound = tolerance("fp32")
    errors = [relative_error(got, want) for got, want in zip(result.logits, want_logits)]
    assert len(errors) == NEW_TOKENS
    assert max(errors) <= bound, (family, lengths, max(errors))


def test_build_writes_a_decoder_engine(built: tuple[str, Path]) -> None:
    family, outdir = built
    manifest = json.loads((outdir / MANIFEST_NAME).read_text())
    assert manifest["engine"]["built"] and (outdir / PLAN_NAME).stat().st_size > 0
    decoder = manifest["decoder"]
    names = [t["past"] for t in decoder["state"]]
    inputs = [i["name"] for i in manifest["io"]["inputs"]]
    outputs = [o["name"] for o in manifest["io"]["outputs"]]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *names]
    assert outputs == ["logits", *(t["present"] for t in decoder["state"])]
    kinds = {t["kind"] for t in decoder["state"]}
    assert kinds == ({"kv", "linear"} if family == "qwen3_next" else {"kv"})
    profiles = {p["name"] for p in manifest["profiles"]}
    assert profiles == {"prefill", "decode"}
    decode = next(p for p in manifest["profiles"] if p["name"] == "decode" and p["input"] == "input_ids")
    assert decode["min"][1] == decode["max"][1] == 1
    assert decoder["max_context"] == 256 and decoder["tokenizer"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])
    assert manifest["fused_ops"]["moetrt::MoE"] == build_demo(family).num_moe_blocks >= 1  # every block
