"""megatron-geno: pretraining genomic foundation models (Genos) on megatron-core."""
