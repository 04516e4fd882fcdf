"""megatron-geno: pretraining genomic foundation models (Genos) on megatron-core."""

from megatron_geno.lifetime import die_with_parent_if_spawned as _die_with_parent_if_spawned

_die_with_parent_if_spawned()
