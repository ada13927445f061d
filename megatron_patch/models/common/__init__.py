"""Pieces shared by the families: the config-table machinery, layer-spec builders and modules that
megatron-core lacks (sequence-parallel-capable norms, ...)."""
