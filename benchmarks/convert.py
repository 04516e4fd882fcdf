"""Wall time and peak RSS of geno-convert each way, against the model's fp32 size, as a table.

    python benchmarks/convert.py                 # genos-1.2b (all 12 layers)
    python benchmarks/convert.py --layers 2      # quicker

A random genos-1.2b HuggingFace directory is written a tensor at a time (bf16 by default, as a
GPU run's checkpoint holds its weights; fp32 master weights live in the optimizer state), then each
conversion runs as its own process so its peak RSS (ru_maxrss of the child) is its own:
from-hf (HF -> torch_dist), to-hf (torch_dist -> HF). The baseline is the fp32 model size,
measured in the same run from the tensors written; the goal is peak RSS < 0.5x of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint_tools.to_hf import hf_config  # noqa: E402
from megatron_geno.config import get_preset  # noqa: E402


def write_random_hf(out: Path, layers: int, dtype: torch.dtype) -> int:
    """Writes a random genos-1.2b Mixtral directory (classic names, a file per layer); returns
    the model's fp32 bytes."""
    from safetensors.torch import save_file

    model = get_preset("genos-1.2b")
    model.num_layers, model.padded_vocab_size = layers, 128
    out.mkdir(parents=True)
    h, d, ffn = model.hidden_size, model.head_dim(), model.moe_ffn_hidden_size
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).to(dtype)  # noqa: E731
    ones = lambda n: torch.ones(n, dtype=dtype)  # noqa: E731
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(128, h),
                                         "lm_head.weight": rand(128, h),
                                         "model.norm.weight": ones(h)}}
    weight_map, numel = {}, 0
    for layer in range(-1, layers):
        if layer >= 0:
            p = f"model.layers.{layer}."
            tensors = {p + "input_layernorm.weight": ones(h),
                       p + "post_attention_layernorm.weight": ones(h),
                       p + "self_attn.q_proj.weight": rand(model.num_attention_heads * d, h),
                       p + "self_attn.k_proj.weight": rand(model.num_query_groups * d, h),
                       p + "self_attn.v_proj.weight": rand(model.num_query_groups * d, h),
                       p + "self_attn.o_proj.weight": rand(h, model.num_attention_heads * d),
                       p + "block_sparse_moe.gate.weight": rand(model.num_experts, h)}
            for e in range(model.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                tensors.update({q + "w1.weight": rand(ffn, h), q + "w3.weight": rand(ffn, h),
                                q + "w2.weight": rand(h, ffn)})
            files = {f"model-layer{layer:03d}.safetensors": tensors}
        for name, tensors in files.items():
            save_file(tensors, str(out / name))
            weight_map.update({k: name for k in tensors})
            numel += sum(t.numel() for t in tensors.values())
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    (out / "config.json").write_text(json.dumps(hf_config(model, name), indent=2))
    return numel * 4


WRAPPER = """
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "checkpoint_tools.cli", *sys.argv[1:]],
                      capture_output=True, text=True)
sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(proc.returncode)
"""


def timed(*args: str) -> tuple[float, float]:
    """Runs geno-convert ARGS under a fresh wrapper; returns (seconds, its peak RSS in GiB)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"geno-convert {args[0]} failed:\n{proc.stderr}")
    return time.perf_counter() - start, int(proc.stdout.split()[-1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="dtype of the weights in the checkpoints (bf16)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model_bytes = write_random_hf(root / "hf", args.layers, dtype)
        rows = [("from-hf", *timed("from-hf", "--hf", str(root / "hf"), "--out", str(root / "mc"))),
                ("to-hf", *timed("to-hf", "--checkpoint", str(root / "mc"), "--out", str(root / "hf2"),
                                 "--dtype", args.dtype))]
    gib = model_bytes / 2**30
    print(f"\ngenos-1.2b with {args.layers} layers, {args.dtype} weights: fp32 model {gib:.2f} GiB")
    print("| direction | wall s | peak RSS GiB | peak RSS / fp32 model |")
    print("|---|---:|---:|---:|")
    for name, seconds, rss in rows:
        print(f"| {name} | {seconds:.1f} | {rss:.2f} | {rss / gib:.2f} |")


if __name__ == "__main__":
    main()
