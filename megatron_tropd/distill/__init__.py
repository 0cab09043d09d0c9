"""Distillation: the teacher's scoring pass and the losses built on its signals."""
