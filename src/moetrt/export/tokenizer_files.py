"""What a generation-ready build directory carries beside the model: the tokenizer, the generation settings and
the chat template of a Hugging Face directory, copied as they are; for the demo models, a small byte-level BPE
tokenizer trained here on fixed text (nothing is downloaded), sized to the demo vocabulary."""

from __future__ import annotations

import codecs
import contextlib
import io
import shutil
from pathlib import Path

from moetrt.core.artifacts import GENERATION_CONFIG_NAME, TOKENIZER_FILE_NAMES

#: The demo tokenizer's one special token, its end of text.
DEMO_EOS = "<|endoftext|>"


def package_tokenizer(spec: str, directory: Path, vocab_size: int | None = None) -> list[str]:
    """Write the tokenizer files of MODEL `spec` into `directory`; returns their names (none for a model that
    has none: a `module:` factory, a Hugging Face directory without tokenizer files)."""
    if spec == "demo" or (spec.startswith("demo:") and not spec.endswith(":block")):
        return write_demo_tokenizer(directory, vocab_size or 512)
    source = Path(spec).expanduser()
    if spec.startswith(("demo:", "module:")) or not source.is_dir():
        return []
    names = []
    for name in (*TOKENIZER_FILE_NAMES, GENERATION_CONFIG_NAME):
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
            names.append(name)
    return names


def write_demo_tokenizer(directory: Path, vocab_size: int) -> list[str]:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens (ids inside the demo model's vocabulary),
    trained on fixed English text, saved as transformers writes a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEMO_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_demo_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=DEMO_EOS, pad_token=DEMO_EOS)
    before = set(p.name for p in directory.iterdir())
    fast.save_pretrained(str(directory))
    return sorted(p.name for p in directory.iterdir() if p.name not in before)


def _demo_corpus() -> list[str]:
    """The Zen of Python (shipped with every Python, rot13-encoded in `this`) and a few lines about MoE."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints it
        import this

    zen = codecs.decode(this.s, "rot13")
    lines = [
        "hello world, hello there. A mixture of experts routes every token to a few experts of many.",
        "The router scores the experts, keeps the top k, and the experts' outputs are summed with weights.",
        "Generation keeps the key and value cache and the linear attention state between steps.",
        "Deployment engineers build engines, run them on the GPU and check them against the reference.",
    ]
    return [*zen.splitlines(), *lines] * 4
