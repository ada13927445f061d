"""Data for megatron-core training: pretraining ``.bin/.idx`` datasets (``pretrain``), the raw-text
toolkit behind ``toolkits/pretrain_data_preprocessing`` (``text_io``, ``_clean``, ``_shard``,
``_preprocess``), and instruction data: SFT (``sft``), reward pairs/lists (``reward``) and RL prompts
(``rl``). Import the submodule you need; this package imports nothing heavy.
"""
