"""Named Genos model presets: data only (the ModelConfig field values of each), and the
published parameter counts. megatron_geno.config builds a ModelConfig from them (get_preset);
megatron_geno.arithmetic counts their parameters and FLOPs."""

# Published sizes: total / active parameters (Genos model card).
PUBLISHED_PARAMS = {"genos-1.2b": (1.2e9, 0.33e9), "genos-10b": (10e9, 2.87e9)}

PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128),
    "genos-1.2b": dict(num_layers=12, hidden_size=1024, num_attention_heads=16,
                       num_query_groups=8, num_experts=8, moe_router_topk=2,
                       moe_ffn_hidden_size=4096),
    "genos-10b": dict(num_layers=12, hidden_size=4096, num_attention_heads=16,
                      num_query_groups=8, num_experts=8, moe_router_topk=2,
                      moe_ffn_hidden_size=8192),
}
