"""Fault injection for crash tests: `TROPD_FAULT=<phase>:<iteration>[,<phase>:<iteration>...]`
makes every rank SIGKILL itself when it reaches that point of that iteration (1-based, the
iteration being computed or saved), as a node failure or `kill -9` would. Unset, `point` costs one
environment lookup.

Phases: `rollout` (the prompts are drawn, nothing generated yet), `optimizer` (the optimiser has
stepped, the LR schedule not yet), `save` (the model files of the checkpoint are written, the
optimiser's not), `commit` (the checkpoint directory is complete and renamed, `latest` not yet
updated).
"""

import os
import signal

ENV = "TROPD_FAULT"


def point(phase: str, iteration: int):
    """Die here if `TROPD_FAULT` names this phase and iteration."""
    spec = os.environ.get(ENV)
    if spec and f"{phase}:{iteration}" in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
