#!/usr/bin/env python3
"""How far quantized experts move each demo model from its native weights, per format.

    python3 bench/quant_accuracy.py --out bench/results/<date>-quant-accuracy

For every demo family: export (fp32, cached decoder), fuse, then store the experts in each format
(`moetrt fuse --weights`, round to nearest). Two numbers per (family, format):
- moe_output: each fused block's output, the op's oracle on the quantized weights against the oracle on the
  native weights, on 64 random tokens (the worst block);
- logits: the quantized model against the native fused model (onnxruntime CPU), prefill of 2x16 tokens and
  a decode step after 7, the worst of the two.
Writes results.json and table.md under --out; prints the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMATS = ("fp8", "int4", "mxfp4")


def _fused_blocks(path: Path) -> list[tuple[object, dict[str, torch.Tensor]]]:
    import onnx_ir as ir

    from moetrt.core.onnx_io import load_onnx
    from moetrt.op.fused_node import check_fused_model, fused_nodes
    from moetrt.verify.probes import stored_tensor

    header = load_onnx(path, load_external_data=False)
    graph = ir.load(str(path)).graph
    blocks = []
    for node, attrs in zip(fused_nodes(header), check_fused_model(header)):
        weights = {
            name: stored_tensor(graph, value)
            for name, value in zip(attrs.present_inputs(), node.input)
            if name != "hidden_states"
        }
        blocks.append((attrs, weights))
    return blocks


def _rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import onnxruntime as ort

    from moetrt.export.demo_models import DEMO_FAMILIES
    from moetrt.export.model_source import load_model
    from moetrt.export.onnx_export import export_onnx
    from moetrt.op.reference import moe_reference
    from moetrt.op.spec import WEIGHTS_OPTIONS
    from moetrt.passes.pipeline import fuse_file, quantize_file
    from moetrt.passes.quantize_experts import ExpertQuantization

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for family in DEMO_FAMILIES:
            exported, native = tmp / f"{family}.onnx", tmp / f"{family}.fused.onnx"
            export_onnx(f"demo:{family}", exported, self_check="off")
            fuse_file(exported, native)
            loaded = load_model(f"demo:{family}")
            cases = [loaded.prefixed_inputs(2, 16, 0, 0), loaded.prefixed_inputs(1, 1, 1, 7)]
            feeds = [{n: t.numpy() for n, t in zip(loaded.input_names, inputs)} for inputs in cases]
            native_session = ort.InferenceSession(str(native))
            native_logits = [native_session.run(["logits"], f)[0] for f in feeds]
            native_blocks = _fused_blocks(native)
            for weights in FORMATS:
                path = tmp / f"{family}.{weights}.onnx"
                quantize_file(native, path, ExpertQuantization(WEIGHTS_OPTIONS[weights]))
                session = ort.InferenceSession(str(path))
                logits = max(_rel(session.run(["logits"], f)[0], ref) for f, ref in zip(feeds, native_logits))
                moe = 0.0
                for (attrs_n, w_n), (attrs_q, w_q) in zip(native_blocks, _fused_blocks(path)):
                    hidden = torch.randn(64, attrs_n.hidden_size, generator=torch.Generator().manual_seed(0))
                    want = moe_reference({"hidden_states": hidden, **w_n}, attrs_n)["output"]
                    got = moe_reference({"hidden_states": hidden, **w_q}, attrs_q)["output"]
                    moe = max(moe, _rel(got, want))
                block = sorted({a.weight_block for a, _ in _fused_blocks(path)})
                row = {
                    "family": family,
                    "weights": weights,
                    "block": block,
                    "moe_output": moe,
                    "logits": logits,
                }
                rows.append(row)
                print(f"{family:12s} {weights:6s} block {block}: MoE output {moe:.3e}, logits {logits:.3e}")

    (args.out / "results.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    table = ["| family | format | block | MoE output rel err | logits rel err |", "|---|---|---|---|---|"]
    table += [
        f"| {r['family']} | {r['weights']} | {', '.join(map(str, r['block']))} | {r['moe_output']:.2e} | "
        f"{r['logits']:.2e} |"
        for r in rows
    ]
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
