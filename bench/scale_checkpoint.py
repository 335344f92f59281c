#!/usr/bin/env python3
"""Write a random-weight Qwen3-Next checkpoint at the released model's width, shard by shard.

    python3 bench/scale_checkpoint.py OUTDIR --layers 2 [--dtype bf16] [--shard-gb 2]

The config is transformers' Qwen3NextConfig defaults (the released 80B-A3B width: hidden 2048, 512 experts,
top-10, shared expert 512, vocab 151936) with `--layers` layers. The model is built on the meta device, so no
full copy of the weights is ever in memory: each tensor is drawn (seeded, fan-in scaled, never zero), written
into the current shard and dropped; `model.safetensors.index.json` maps every key to its shard, as
save_pretrained writes it. Peak memory is about one shard.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_checkpoint(outdir: Path, layers: int, dtype: torch.dtype, shard_bytes: int, seed: int = 0) -> int:
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    config = Qwen3NextConfig(num_hidden_layers=layers)
    config.layer_types = config.layer_types[:layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    outdir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(outdir)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    weight_map: dict[str, str] = {}
    total = 0
    names = list(model.state_dict().keys())
    tensors = model.state_dict()

    def flush(index: int) -> None:
        name = f"model-{index + 1:05d}.safetensors"
        save_file(shards[index], str(outdir / name), metadata={"format": "pt"})
        for key in shards[index]:
            weight_map[key] = name
        shards[index] = {}

    for key in names:
        meta = tensors[key]
        values = torch.empty(meta.shape, dtype=dtype)
        rows = values.view(-1, meta.shape[-1]) if meta.ndim >= 2 else values.view(1, -1)
        for start in range(0, rows.shape[0], 4096):  # drawn in float32 a slice at a time: no fp32 copy
            chunk = torch.randn(rows[start : start + 4096].shape, generator=gen, dtype=torch.float32)
            if meta.ndim >= 2:
                chunk *= meta.shape[-1] ** -0.5  # fan-in scaling
            else:  # norms, biases, decay parameters: near their identity, never exactly it
                chunk = 1.0 + 0.02 * chunk
            rows[start : start + 4096] = chunk.to(dtype)
        nbytes = values.numel() * values.element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush(len(shards) - 1)
            shards.append({})
            sizes.append(0)
        shards[-1][key] = values
        sizes[-1] += nbytes
        total += nbytes
    flush(len(shards) - 1)
    count = len(shards)
    renamed = {}
    for key, name in weight_map.items():  # model-0000i-of-0000n.safetensors, as save_pretrained names them
        index = int(name[6:11])
        renamed[key] = f"model-{index:05d}-of-{count:05d}.safetensors"
    for index in range(1, count + 1):
        (outdir / f"model-{index:05d}.safetensors").rename(
            outdir / f"model-{index:05d}-of-{count:05d}.safetensors"
        )
    index_doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(renamed.items()))}
    (outdir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    total = write_checkpoint(args.outdir, args.layers, dtype, int(args.shard_gb * 1e9))
    print(
        f"wrote {args.outdir}: {args.layers} layers, {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
