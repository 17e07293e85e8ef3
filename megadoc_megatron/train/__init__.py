"""Pre-training on megatron-core: config, launch, data, engines (GPU: megatron-core; CPU: portable),
checkpoints, metrics."""
