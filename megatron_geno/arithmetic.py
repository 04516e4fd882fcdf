"""Model arithmetic in closed form, without building a model: the padded vocabulary, parameter
counts (total and active per token) and training FLOPs per token."""

from __future__ import annotations

from megatron_geno.config import ConfigError, ModelConfig

# dense bf16 peak FLOP/s per GPU, for MFU (metrics) and the expected step time (launch.plan)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Returns vocab_size rounded up to a multiple of divisible_by x tensor_parallel."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def resolve_padded_vocab(model: ModelConfig, vocab_size: int, tensor_parallel: int) -> int:
    """Returns the model's padded vocabulary: the configured one (checked), or the derived one."""
    if model.padded_vocab_size is None:
        return padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, tensor_parallel)
    if model.padded_vocab_size < vocab_size or model.padded_vocab_size % tensor_parallel:
        raise ConfigError(
            f"model.padded_vocab_size={model.padded_vocab_size} must be >= the tokenizer's "
            f"{vocab_size} entries and divisible by parallel.tensor_parallel={tensor_parallel}"
        )
    return model.padded_vocab_size


def count_parameters(model: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Returns total and active (per token) parameter counts, computed without building the model.

    ``vocab_size`` is the padded vocabulary. Counts match megatron-core's GPTModel with the local or
    TE spec: QKV, output projection, router, SwiGLU experts (fc1 is gate+up), two RMSNorms per layer,
    final norm, untied input embedding and output layer, no biases.
    """
    h, d = model.hidden_size, model.head_dim()
    q = model.num_attention_heads * d
    kv = 2 * model.num_query_groups * d
    attention = h * (q + kv) + q * h
    expert = 3 * h * model.moe_ffn_hidden_size
    router = model.num_experts * h
    norms = 2 * h
    per_layer_total = attention + model.num_experts * expert + router + norms
    per_layer_active = attention + model.moe_router_topk * expert + router + norms
    embeddings = 2 * vocab_size * h
    final_norm = h
    return {
        "total": model.num_layers * per_layer_total + embeddings + final_norm,
        "active": model.num_layers * per_layer_active + embeddings + final_norm,
        "embeddings": embeddings,
        "per_layer_attention": attention,
        "per_expert": expert,
    }


def flops_per_token(model: ModelConfig, vocab_size: int, seq_length: int) -> int:
    """Returns training FLOPs per token (forward + backward = 3x forward) for MFU.

    Forward: 2 x active matmul parameters (embedding lookup excluded, output layer included)
    plus causal attention scores and values, 2 x 2 x seq x (heads x head_dim) / 2 per layer.
    """
    counts = count_parameters(model, vocab_size)
    matmul_params = counts["active"] - counts["embeddings"] // 2
    attn = model.num_layers * 2 * seq_length * model.num_attention_heads * model.head_dim()
    return 3 * (2 * matmul_params + attn)
