"""$MOETRT_KERNEL_CONFIGS: a folder of sm<SM>.json tables whose entries take precedence over the package's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moetrt.cli import main
from moetrt.core.errors import MoetrtError
from moetrt.kernels import configs
from moetrt.op.spec import MoEAttributes

SHAPE = MoEAttributes(8, 2, 64, 48)
OTHER = MoEAttributes(12, 3, 64, 48)


@pytest.fixture
def package_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package config folder in tmp_path with one sm90 entry per shape, the table cache cleared around."""
    folder = tmp_path / "package"
    folder.mkdir()
    entries = {
        configs.entry_key(attrs, "bfloat16", None): {"gate_up": {"BM": 32, "BN": 32}}
        for attrs in (SHAPE, OTHER)
    }
    (folder / "sm90.json").write_text(json.dumps({"entries": entries}))
    monkeypatch.setattr(configs, "CONFIG_DIR", folder)
    monkeypatch.delenv(configs.KERNEL_CONFIGS_ENV, raising=False)
    configs._load_table.cache_clear()
    yield folder
    configs._load_table.cache_clear()


def _use_overlay(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """$MOETRT_KERNEL_CONFIGS pointed at `folder`, read afresh (the table is cached per SM)."""
    monkeypatch.setenv(configs.KERNEL_CONFIGS_ENV, str(folder))
    configs._load_table.cache_clear()


def _overlay_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    return folder


def test_overlay_entries_win_and_the_package_fills_the_rest(
    package_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = _overlay_folder(tmp_path)
    key = configs.entry_key(SHAPE, "bfloat16", None)
    (mine / "sm90.json").write_text(json.dumps({"entries": {key: {"gate_up": {"BM": 128, "BN": 64}}}}))
    assert configs.select_config(SHAPE, "bfloat16", 90, None)["gate_up"]["BM"] == 32  # before: the package's
    _use_overlay(monkeypatch, mine)
    tuned = configs.select_config(SHAPE, "bfloat16", 90, None)["gate_up"]
    assert (tuned["BM"], tuned["BN"]) == (128, 64)
    assert configs.select_config(OTHER, "bfloat16", 90, None)["gate_up"]["BM"] == 32  # not in the overlay
    # an SM the overlay has no table for: the package's (here none, so the defaults)
    default_bm = configs.default_config(SHAPE, "bfloat16", None, 89)["gate_up"]["BM"]
    assert configs.select_config(SHAPE, "bfloat16", 89, None)["gate_up"]["BM"] == default_bm


def test_a_tuned_file_written_there_is_read_back(
    package_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moetrt tune -o FOLDER/sm90.json` writes the file the overlay reads."""
    mine = _overlay_folder(tmp_path)
    key = configs.entry_key(SHAPE, "bfloat16", None)
    configs.write_table({key: {"gate_up": {"BM": 64, "BN": 128}, "us": 1.0}}, 90, mine / "sm90.json")
    _use_overlay(monkeypatch, mine)
    assert configs.select_config(SHAPE, "bfloat16", 90, None)["gate_up"]["BN"] == 128


def test_bad_overlays_are_refused_in_one_line(
    package_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_folder = tmp_path / "sm90.json"
    not_a_folder.write_text("{}")
    _use_overlay(monkeypatch, not_a_folder)
    with pytest.raises(MoetrtError, match="is not a folder"):
        configs.select_config(SHAPE, "bfloat16", 90, None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sm90.json").write_text('{"entries": ')
    _use_overlay(monkeypatch, broken)
    with pytest.raises(MoetrtError, match=r"sm90\.json is not valid"):
        configs.select_config(SHAPE, "bfloat16", 90, None)
    # through the CLI: one line, a non-zero exit, no kernel bundle written
    out = tmp_path / "k.bin"
    _use_overlay(monkeypatch, not_a_folder)
    attrs = json.dumps({"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 48})
    result = CliRunner().invoke(main, ["aot", "--attrs", attrs, "--sm", "90", "-o", str(out)])
    assert result.exit_code != 0 and not out.exists()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any("is not a folder" in line for line in lines) and len(lines) <= 2, result.output
