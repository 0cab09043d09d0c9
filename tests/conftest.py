import torch

# tests/gpu checks the CUDA path against the CPU path: collected only on a machine with a GPU.
collect_ignore = [] if torch.cuda.is_available() else ["gpu"]
