"""Tiny configs of the model families whose attention has windows, soft-capping or sinks (shared by
the Hugging Face training and generation tests): every second layer windowed."""


def mask_configs(window: int) -> dict[str, dict]:
    """transformers config class name -> overrides for a tiny random-weight model."""
    layers = ["sliding_attention", "full_attention"]
    return {
        "Gemma2Config": dict(head_dim=16, attn_logit_softcapping=0.5, sliding_window=window, layer_types=layers),
        "Gemma3TextConfig": dict(head_dim=16, sliding_window=window, layer_types=layers),
        "GptOssConfig": dict(head_dim=16, sliding_window=window, num_local_experts=4, num_experts_per_tok=2,
                             layer_types=layers, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }
