"""Training on megatron-core: arguments, engine (model provider, DDP, optimizer, loop), checkpoints,
logs, and the pretraining entry point (``python -m megatron_patch.training.pretrain``)."""
