"""Tokenizer packaging: a Hugging Face directory's files are copied as they are; the demo tokenizer is made here,
loads with transformers and stays inside the demo vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from moetrt.export.tokenizer_files import package_tokenizer


def test_hugging_face_files_are_copied_as_they_are(tmp_path: Path) -> None:
    source, out = tmp_path / "model", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    files = {
        "tokenizer.json": '{"version": "1.0"}',
        "tokenizer_config.json": '{"eos_token": "</s>"}',
        "chat_template.jinja": "{{ messages }}",
        "generation_config.json": json.dumps({"eos_token_id": [2, 7]}),
        "config.json": "{}",  # not a tokenizer file: stays behind
    }
    for name, text in files.items():
        (source / name).write_text(text)
    copied = package_tokenizer(str(source), out)
    assert sorted(copied) == sorted(set(files) - {"config.json"})
    for name in copied:
        assert (out / name).read_text() == files[name]
    assert not (out / "config.json").exists()
    assert package_tokenizer("module:x.py:f", out) == []
    assert package_tokenizer("demo:mixtral:block", out) == []


def test_demo_tokenizer_loads_and_fits_the_vocabulary(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    names = package_tokenizer("demo:qwen3_next", tmp_path, vocab_size=512)
    assert "tokenizer.json" in names
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ids = tokenizer("hello world, a mixture of experts")["input_ids"]
    assert ids and max(tokenizer.get_vocab().values()) < 512
    assert tokenizer.decode(ids) == "hello world, a mixture of experts"
