"""Tiny hybrid / recurrent configurations, taken as facts from mlx-lm's ``tests/test_models.py``.

Each entry is the configuration mlx-lm's own test suite builds its tiny instance of an
architecture from (random weights), with one change: ``vocab_size`` is the tiny recipe's
512, so that the tiny tokenizer can decode whatever the model generates.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.nn.layers.embedding import Embedding
from mlx.nn.layers.linear import Linear

from kvpool.mlx.mlx_lm import model_module

VOCAB_SIZE = 512

HYBRID_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_next": {
        "model_type": "qwen3_next",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 3,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 128,
        "mlp_only_layers": [0],
        "moe_intermediate_size": 128,
        "rms_norm_eps": 1e-5,
        "head_dim": 64,
        "rope_theta": 1000.0,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 1000,
    },
    "qwen3_5": {
        "model_type": "qwen3_5",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 3,
        "rms_norm_eps": 1e-5,
        "head_dim": 64,
        "rope_theta": 1000.0,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 1000,
    },
    "lfm2": {
        "model_type": "lfm2",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1000,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 128,
        "block_ff_dim": 128,
        "block_multiple_of": 4,
        "block_ffn_dim_multiplier": 2,
        "block_auto_adjust_ff_dim": True,
        "layer_types": ["full_attention", "", "full_attention", ""],
        "rope_theta": 1000,
    },
    "nemotron_h": {
        "model_type": "nemotron_h",
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "max_position_embeddings": 1000,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "attention_bias": False,
        "mamba_num_heads": 8,
        "mamba_head_dim": 64,
        "mamba_proj_bias": False,
        "ssm_state_size": 128,
        "conv_kernel": 3,
        "n_groups": 4,
        "time_step_limit": [1.0, 2.0],
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-4,
        "rms_norm_eps": 1e-5,
        "use_bias": True,
        "use_conv_bias": True,
        "residual_in_fp32": True,
        "hybrid_override_pattern": ["*", "M", "*", "M"],
    },
    "granitemoehybrid": {
        "model_type": "granitemoehybrid",
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "max_position_embeddings": 1000,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "attention_bias": False,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 1.0,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 128,
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_proj_bias": False,
        "mamba_d_state": 128,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": False,
        "layer_types": ["mamba", "attention", "mamba", "attention"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000.0,
    },
    "mamba2": {
        "model_type": "mamba2",
        "num_heads": 8,
        "head_dim": 16,
        "hidden_size": 128,
        "intermediate_size": 128,
        "state_size": 32,
        "num_hidden_layers": 4,
        "layer_norm_epsilon": 1e-4,
        "conv_kernel": 3,
        "n_groups": 4,
        "use_bias": False,
        "use_conv_bias": False,
        "tie_word_embeddings": True,
        "time_step_limit": (0.01, 10),
        "time_step_rank": "auto",
    },
    "mamba": {
        "model_type": "mamba",
        "use_bias": False,
        "use_conv_bias": True,
        "conv_kernel": 4,
        "hidden_size": 768,
        "num_hidden_layers": 24,
        "state_size": 16,
        "intermediate_size": 1536,
        "time_step_rank": 48,
    },
}


def build_hybrid(name: str, *, seed: int = 0, weight_scale: float = 4.0) -> Any:
    """The tiny model of ``name`` in float32, Linear and Embedding weights scaled by
    ``weight_scale`` (random default weights repeat one token whatever the context)."""
    config = {**HYBRID_CONFIGS[name], "vocab_size": VOCAB_SIZE}
    module = model_module(config["model_type"])
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    for _, layer in model.named_modules():
        if isinstance(layer, (Linear, Embedding)):
            layer.weight = layer.weight * weight_scale
    mx.eval(model.parameters())
    return model
