"""Checkpoint layout and HF <-> Megatron conversion.

- ``layout``: the legacy checkpoint layout shared with training (tracker, rank files, metadata)
- ``rules``: the sharding rules (replicated, column, row, vocab, fused QKV, gated MLP), both ways
- ``mapping``: mapping-table rows with layer/expert wildcards
- ``hf_io`` / ``mg_io``: streaming readers and writers of HF and Megatron checkpoints
- ``engine``: ``hf_to_megatron``, ``megatron_to_hf``, ``reshard``
- ``dist``: reading megatron-core ``torch_dist`` checkpoints
- ``load``: loading one rank's part into a built model; ``compare``: HF vs Megatron logits
- ``cli``: the command line the toolkits scripts call
"""
