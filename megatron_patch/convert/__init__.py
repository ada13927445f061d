"""Checkpoint layout and HF <-> Megatron conversion (sharding rules, mapping tables, IO)."""
