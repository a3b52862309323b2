"""MoE building blocks that plug into megatron-core's MoE layer: experts and their variants."""
