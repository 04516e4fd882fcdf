"""geno-eval: held-out loss, zero-shot variant effect and embeddings of a checkpoint or export."""
