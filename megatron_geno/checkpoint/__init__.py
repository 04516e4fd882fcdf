"""The parts of checkpointing, by job (trust, integrity, layout, state); megatron_geno.checkpointing
is the API that uses them."""
