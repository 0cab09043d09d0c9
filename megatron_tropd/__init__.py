"""megatron-tropd: Trust Region On-Policy Distillation on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import time that optional GPU packages are missing; on a CPU host
# (and with the local layer spec) that is expected, not something to act on.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", message=r"Apex is not installed.*")
