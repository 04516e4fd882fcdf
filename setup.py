"""megatron-geno: pretraining genomic foundation models (Genos) on megatron-core."""

from setuptools import find_packages, setup

MEGATRON_CORE = "megatron-core==0.16.1"

setup(
    name="megatron-geno",
    version="0.1.0",
    description="Pretrain Genos-style genomic MoE foundation models on megatron-core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_geno*", "checkpoint_tools*", "data_pipeline*", "launch*"]),
    package_data={"launch": ["recipes/*.yaml", "torchrun.sh", "slurm/*.sbatch"]},
    install_requires=[
        "torch>=2.4",
        MEGATRON_CORE,
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",  # dist_checkpointing's writer needs it
        "tensorboard",
        "einops",
        "zarr>=3.0,<4",
        "numcodecs",
        "google-crc32c",  # shard index checksums (zarr uses the same package)
        "isal",  # fast gzip/bgzip decompression in data_pipeline
        "safetensors>=0.4",  # geno-convert reads and writes HF weights with it
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "hf": ["transformers>=4.45", "tokenizers"],
        "test": ["pytest", "pytest-xdist>=3.5,<4", "hypothesis>=6.100,<7"],
        "track": ["wandb"],  # logging.wandb (optional; offline mode needs no network)
        "eval": ["pysam>=0.22"],  # geno-eval variants / embed read VCF, BCF and FASTA with it
        "bench": ["biopython"],  # the baseline of benchmarks/preprocess_throughput.py
        "finetune": ["deepspeed"],
    },
    entry_points={
        "console_scripts": [
            "geno-train=megatron_geno.cli:main",
            "geno-convert=checkpoint_tools.cli:main",
            "geno-preprocess=data_pipeline.cli:main",
            "geno-launch=launch.cli:main",
            "geno-eval=megatron_geno.evaluation.cli:main",
        ],
        # zarr finds the store's token codec wherever this package is installed
        "zarr.codecs": ["megatron_geno.dna2bit=data_pipeline.dna2bit:DNA2BitCodec"],
    },
)
