#!/usr/bin/env python3
"""Every MoE family of the installed transformers, tiny: does it export (and check itself), fuse, and does the
fused model compute what the export does?

    PYTHONPATH=src python3 bench/family_survey.py --out bench/results/<date>-families [--families a,b]

A family is a `models/<type>/modeling_<type>.py` with a causal LM and a class named *MoE* / *SparseMoe*. Its
tiny config is the family's defaults with every size the survey knows shrunk (hidden 64, 2 layers, 8 experts,
top-2, ...); families whose config or model cannot be built that way are listed as such. Each family runs in
a process of its own with a time limit. Writes families.json and families.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "ffn_hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 512,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "moe_layer_start_index": 0,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "sliding_window": 16,
    "num_shared_experts": 1,
    "n_shared_experts": 1,
    "moe_num_shared_experts": 1,
}

ONE = r"""
import sys, json, tempfile, traceback
from pathlib import Path
import torch
family = sys.argv[1]
shrink = json.loads(sys.argv[2])
result = {"family": family}
def done(status, detail=""):
    result.update(status=status, detail=" ".join(str(detail).split())[:300]); print("RESULT " + json.dumps(result)); sys.exit(0)
try:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(family)
    for key, value in shrink.items():
        if hasattr(config, key):
            setattr(config, key, value)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in shrink.items():
        if hasattr(text, key):
            setattr(text, key, value)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[: text.num_hidden_layers]
    if getattr(text, "qk_rope_head_dim", None) and hasattr(text, "head_dim"):
        text.head_dim = text.qk_rope_head_dim  # multi-head latent attention: rotary width is the head_dim
        text.num_key_value_heads = text.num_attention_heads  # and every head has its own keys
        if hasattr(text, "qk_head_dim"):
            text.qk_head_dim = text.qk_nope_head_dim + text.qk_rope_head_dim
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the released vocabulary
        if isinstance(getattr(text, key, None), int) and getattr(text, key) >= text.vocab_size:
            setattr(text, key, 0)
    config._experts_implementation = "batched_mm"; config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    from moetrt.export.demo_models import init_demo_weights
    init_demo_weights(model, text, seed=1)
except Exception as err:
    done("tiny model not buildable", f"{type(err).__name__}: {err}")
from moetrt.core.errors import MoetrtError
from moetrt.export.loaded import causal_lm
from moetrt.export.onnx_export import export_onnx
from moetrt.passes import fuse_file
loaded = causal_lm(model, int(text.vocab_size), f"transformers:{family}", torch.float32, family)
result["moe_blocks"] = loaded.num_moe_blocks
tmp = Path(tempfile.mkdtemp())
try:
    export_onnx(loaded, tmp / "m.onnx", self_check="error")
except MoetrtError as err:
    done("export refused by its self-check" if "does not match PyTorch" in err.message else "export fails", err.one_line())
except Exception as err:
    done("export fails", f"{type(err).__name__}: {traceback.format_exception_only(err)[-1]}")
try:
    fused = fuse_file(tmp / "m.onnx", tmp / "f.onnx")
except Exception as err:
    done("fuse fails", f"{type(err).__name__}: {err}")
result["fused"] = fused.num_fused
import numpy as np, onnxruntime as ort
ids = loaded.make_inputs(2, 9, 5)[0].numpy()
run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
want, got = run(tmp / "m.onnx"), run(tmp / "f.onnx")
rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
result["fused_vs_export_rel_err"] = rel
if fused.num_fused == loaded.num_moe_blocks and fused.num_fused and rel <= 1e-5:
    done("exports, self-checks, fuses every block, matches")
reasons = sorted({c.check for c in fused.unfused_candidates})
done(f"exports and self-checks; fused {fused.num_fused} of {loaded.num_moe_blocks} blocks", "; ".join(reasons) or f"rel err {rel:.1e}")
"""


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def families() -> list[str]:
    import transformers

    root = Path(transformers.__file__).parent / "models"
    found = []
    for folder in sorted(root.iterdir()):
        source = folder / f"modeling_{folder.name}.py"
        if source.is_file():
            text = source.read_text()
            if re.search(r"class \w+(SparseMoe|MoE|Moe)\w*\(", text) and "ForCausalLM" in text:
                found.append(folder.name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=None)
    parser.add_argument("--timeout-s", type=int, default=240)
    parser.add_argument("--jobs", type=int, default=1, help="families surveyed at once")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.families.split(",") if args.families else families()

    def survey(name: str) -> dict:
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-c", ONE, name, json.dumps(SHRINK)],
                capture_output=True,
                text=True,
                timeout=args.timeout_s,
            )
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row = (
                json.loads(line[7:])
                if line
                else {"family": name, "status": "crashed", "detail": done.stderr.strip().splitlines()[-1:]}
            )
        except subprocess.TimeoutExpired:
            row = {"family": name, "status": f"over the {args.timeout_s} s limit", "detail": ""}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each family is its own process
        rows = list(pool.map(survey, names))
    table = ["| family | status | detail |", "|---|---|---|"]
    table += [f"| {r['family']} | {r['status']} | {str(r.get('detail', ''))[:160]} |" for r in rows]
    (args.out / "families.md").write_text("\n".join(table) + "\n")
    (args.out / "families.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "transformers": transformers_version(),
                "command": " ".join(sys.argv),
                "rows": rows,
            },
            indent=1,
        )
    )
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
