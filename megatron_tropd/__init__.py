"""megatron-tropd: Trust Region On-Policy Distillation on megatron-core."""

from megatron_tropd.runtime import console

__version__ = "0.1.0"

# Before any megatron-core import: its known-harmless warnings are filtered (console.py says which
# and why; TROPD_VERBOSE=1 or --verbose shows them).
console.install()
