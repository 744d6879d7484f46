"""Named moments of a run where a test can stop it, to kill it there (tests/test_kill.py).

``MCMDPO_TEST_PAUSE_AT=NAME:N`` makes the process stop itself with ``SIGSTOP`` the N-th time it
reaches the moment NAME (``NAME`` alone: the first time). The test waits until the process is
stopped, then sends ``SIGKILL`` to its process group: the kill lands at that exact moment, not
wherever a timer happens to fall. Unset (always, outside tests), the points do nothing.

==========  ==============================================================================  =========
NAME        the moment                                                                      N counts
==========  ==============================================================================  =========
reference   the cached reference pass, after this process's N-th record                     records
save        saving checkpoint-N, its weights written to ``.tmp-checkpoint-N``, the rest not  the step
step        inside step N: gradients computed, the optimizer not yet stepped                the step
==========  ==============================================================================  =========
"""

from __future__ import annotations

import os
import signal

from transformers import TrainerCallback

ENV = "MCMDPO_TEST_PAUSE_AT"


def pause_at(name: str, count: int) -> None:
    """Stop this process here if ``MCMDPO_TEST_PAUSE_AT`` names this moment (``name``, ``name:count``)."""
    wanted = os.environ.get(ENV)
    if wanted and wanted in (name, f"{name}:{count}"):
        os.kill(os.getpid(), signal.SIGSTOP)


class PauseMidStep(TrainerCallback):
    """The ``step`` point: called after the backward passes of a step, before its optimizer update."""

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        pause_at("step", state.global_step + 1)
