"""`moetrt generate`: text and ids in, streamed text and JSON out, sampling, and the one-line refusals of
bad requests (nothing runs, non-zero exit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, invoke

from moetrt.build import build
from moetrt.build_request import BuildOptions
from moetrt.core.artifacts import ONNX_NAME
from moetrt.core.errors import MoetrtError
from moetrt.export.loaded import UNCACHED
from moetrt.export.onnx_export import export_onnx
from moetrt.runtime.generation import Sampling, choose_tokens
from moetrt.runtime.session import Session
from moetrt.trt.targets import DimRange


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("generate") / "out"
    options = BuildOptions(
        target="rtx40",
        precision="fp32",
        engine_backend="tensorrt-rtx",
        parity=False,
        tokens=DimRange(1, 8, 32),
        max_context=64,
    )
    build("demo:qwen3_moe", outdir, options)
    return outdir


def test_generate_prints_text_then_speed(built: Path) -> None:
    code, out, err = invoke(
        "generate", str(built), "--prompt", "hello world", "--max-new-tokens", "8", "--backend", "onnxruntime"
    )
    assert code == 0, err
    assert out.strip(), "the decoded text"
    assert "prefill:" in err and "decode: 7 tokens" in err and "tokens/s" in err


def test_generate_json_for_two_prompts(built: Path) -> None:
    code, out, err = invoke(
        "generate",
        str(built),
        "--prompt-ids",
        "5,6,7,8,9",
        "--prompt-ids",
        "10,11",
        "--max-new-tokens",
        "6",
        "--backend",
        "onnxruntime",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert [len(ids) for ids in result["ids"]] == [6, 6] and result["prompt_tokens"] == [5, 2]
    assert len(result["text"]) == 2 and all(isinstance(t, str) for t in result["text"])
    assert result["decode_tokens_per_s"] > 0 and result["backend"] == "onnxruntime"
    # The second prompt alone (no padding) gives the same tokens: padding changes nothing.
    code, alone, err = invoke(
        "generate",
        str(built),
        "--prompt-ids",
        "10,11",
        "--max-new-tokens",
        "6",
        "--backend",
        "onnxruntime",
        "--json",
    )
    assert code == 0, err
    assert json.loads(alone)["ids"][0] == result["ids"][1]


def test_stop_id_ends_a_sequence(built: Path) -> None:
    code, out, err = invoke(
        "generate",
        str(built),
        "--prompt-ids",
        "3,4,5",
        "--max-new-tokens",
        "6",
        "--backend",
        "onnxruntime",
        "--json",
    )
    first = json.loads(out)["ids"][0]
    stop = first[2]
    code, out, err = invoke(
        "generate",
        str(built),
        "--prompt-ids",
        "3,4,5",
        "--max-new-tokens",
        "6",
        "--backend",
        "onnxruntime",
        "--json",
        "--stop-id",
        str(stop),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["ids"][0] == first[: first.index(stop) + 1] and result["stopped"] == [True]


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = choose_tokens(logits, Sampling(), torch.Generator())
    assert torch.equal(greedy, logits.argmax(-1))
    one = choose_tokens(logits, Sampling(temperature=1.0, top_k=1), torch.Generator().manual_seed(1))
    assert torch.equal(one, greedy)
    draws = [
        choose_tokens(logits, Sampling(temperature=1.5, top_p=0.9), torch.Generator().manual_seed(s))
        for s in (7, 7)
    ]
    assert torch.equal(draws[0], draws[1])
    many = torch.stack(
        [
            choose_tokens(logits, Sampling(temperature=2.0), torch.Generator().manual_seed(s))
            for s in range(20)
        ]
    )
    assert (many != greedy).any(), "sampling at temperature 2 never left the argmax"
    tiny = choose_tokens(logits, Sampling(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(3))
    assert torch.equal(tiny, greedy), "top-p keeps at least the most likely token"
    with pytest.raises(MoetrtError, match="top-p"):
        Sampling(top_p=0)


def test_bad_requests_are_one_line_errors(built: Path, tmp_path: Path) -> None:
    onnxruntime = ("--backend", "onnxruntime")
    long_prompt = ",".join(["7"] * 70)
    code, _, err = invoke(
        "generate", str(built), "--prompt-ids", long_prompt, "--max-new-tokens", "2", *onnxruntime
    )
    assert_one_line_error(code, err, "over this artifact's 64", "--max-context")
    code, _, err = invoke("generate", str(built), "--prompt", "hi", "--max-new-tokens", "0", *onnxruntime)
    assert_one_line_error(code, err, "--max-new-tokens is 0")
    code, _, err = invoke("generate", str(built), "--prompt-ids", "1,x", *onnxruntime)
    assert_one_line_error(code, err, "not a comma list")
    code, _, err = invoke("generate", str(built), "--prompt-ids", "1,99999", *onnxruntime)
    assert_one_line_error(code, err, "outside the vocabulary")
    code, _, err = invoke("generate", str(built), *onnxruntime)
    assert_one_line_error(code, err, "no prompt given")
    if not torch.cuda.is_available():  # the build's engine needs a GPU: the error says how to run here
        code, _, err = invoke("generate", str(built), "--prompt-ids", "1,2")
        assert_one_line_error(code, err, "no CUDA GPU is visible", "--backend onnxruntime")

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(built / ONNX_NAME, bare / ONNX_NAME)  # a cached .onnx without its directory's tokenizer
    code, _, err = invoke("generate", str(bare / ONNX_NAME), "--prompt", "hello")
    assert_one_line_error(code, err, "has no tokenizer", "--prompt-ids")
    code, out, err = invoke("generate", str(bare / ONNX_NAME), "--prompt-ids", "1,2", "--max-new-tokens", "3")
    assert code == 0, err
    assert len(out.split()) == 3, "ids printed as they come when there is no tokenizer"

    uncached = tmp_path / "uncached.onnx"
    export_onnx("demo:qwen3_moe", uncached, form=UNCACHED, self_check="off")
    code, _, err = invoke("generate", str(uncached), "--prompt-ids", "1,2")
    assert_one_line_error(code, err, "not a cached decoder", "without --no-cache")


def test_state_of_the_wrong_shape_is_named(built: Path) -> None:
    session = Session(built / ONNX_NAME)
    assert session.state is not None
    feeds = {
        "input_ids": torch.tensor([[1, 2, 3]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.int64),
        "position_ids": torch.tensor([[2, 3, 4]]),
    }
    for tensor in session.state:
        shape = [1 if d == "batch" else 2 if d == "past" else int(d) for d in tensor.shape]
        feeds[tensor.past] = torch.randn(shape)
    assert session(feeds)["logits"].shape == (1, 3, 512)
    wrong_batch = dict(
        feeds, **{session.state[0].past: torch.randn(2, *feeds[session.state[0].past].shape[1:])}
    )
    with pytest.raises(MoetrtError, match=r"has shape \[2, .*expected \[1, .*batch 1, past 2"):
        session(wrong_batch)
    wrong_past = dict(feeds, attention_mask=torch.ones(1, 9, dtype=torch.int64))
    with pytest.raises(MoetrtError, match="past 6 from attention_mask"):
        session(wrong_past)


def test_default_verify_shapes_fit_a_default_decoder_build() -> None:
    """`moetrt verify --engine` of a default build runs its default shapes: prefill after a past included."""
    from moetrt.trt.profiles import check_in_profile, make_profiles
    from moetrt.verify.compare import default_shapes

    options = BuildOptions()
    inputs = [
        ("input_ids", ["batch", "seq"]),
        ("attention_mask", ["batch", "total"]),
        ("position_ids", ["batch", "seq"]),
        ("past_key_values.0.key", ["batch", 2, "past", 16]),
    ]
    profiles = make_profiles(inputs, options.tokens, options.batch, options.context_limit())
    for batch, seq, past in default_shapes((2, 72), 130, decoder=True):
        shapes = {
            "input_ids": [batch, seq],
            "attention_mask": [batch, past + seq],
            "position_ids": [batch, seq],
            "past_key_values.0.key": [batch, 2, past, 16],
        }
        assert check_in_profile(profiles, shapes) == (1 if seq == 1 else 0)


def test_chat_renders_the_models_template(built: Path, tmp_path: Path) -> None:
    code, _, err = invoke("generate", str(built), "--prompt", "hi", "--chat", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "has no chat template", "leave out --chat")
    with_template = tmp_path / "chat"
    shutil.copytree(built, with_template)
    (with_template / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(with_template))
    rendered = "<|user|> hello\n<|assistant|> "
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    args = (
        "generate",
        str(with_template),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "2",
        "--backend",
        "onnxruntime",
    )
    code, out, err = invoke(*args, "--chat", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == [len(expected)] and len(expected) > len(
        tokenizer("hello")["input_ids"]
    )
    code, _, err = invoke(
        "generate", str(with_template), "--prompt-ids", "1,2", "--chat", "--backend", "onnxruntime"
    )
    assert_one_line_error(code, err, "--chat renders text prompts")
