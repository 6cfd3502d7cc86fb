"""Framework integrations: ``megatron`` (Megatron-Core / Megatron-LM) and ``deepspeed``.

Import the submodule you need; each imports its framework lazily where it can.
"""
