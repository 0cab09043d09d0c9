"""Rollouts: generation on this rank's model stage (KV cache, TP/PP, vocabulary-parallel sampling),
teacher-prefix continuation and teacher responses."""
