"""Checkpoints on disk: the trainer's (`trainer`: iteration directories, exact resume, the --save
lock; `resume_flags`: what a resume keeps), the Megatron model directory (`model_dir`), HF
safetensors and tokenizer files (`hf_files`), the HF name mapping (`hf_mapping`) and the global <->
per-rank sharding (`sharding`) that conversion (`conversion`) joins, and logit parity against
transformers (`parity`)."""

from megatron_tropd.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read or written as asked: one-line message."""
