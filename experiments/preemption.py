"""Preemption: SIGTERM or SIGINT stops a run after the current step, at a step every process
agrees on, so that it can save a checkpoint there and exit with :data:`EXIT_PREEMPTED`.

One process: a handler for both signals only sets a flag; the training loop asks
:meth:`Watch.reached` after every step. Several processes (``jax.distributed``): JAX's
preemption service receives SIGTERM on any process and agrees with the others on the step at
which all of them stop (``multihost_utils.reached_preemption_sync_point``, which orbax's
``CheckpointManager.reached_preemption`` wraps); no Python handler is installed then, as it
would replace JAX's, and SIGINT keeps its default (``KeyboardInterrupt``, no checkpoint).
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL of sysexits.h: a temporary failure, the command may be run again (--resume).
EXIT_PREEMPTED = 75

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a preemption signal after saving the checkpoint of ``step``."""

  def __init__(self, step: int, epoch: int, step_in_epoch: int, steps_per_epoch: int):
    self.step = step
    super().__init__(
        f"preempted: stopped after step {step} (step {step_in_epoch} of {steps_per_epoch} in "
        f"epoch {epoch + 1}) and saved a checkpoint there; continue with --resume"
    )


class Watch:
  """A context manager that turns SIGTERM/SIGINT into a request to stop after the step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def _request(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum)

  def __enter__(self) -> Watch:
    # Handlers can only be set from the main thread; JAX handles SIGTERM when multi-process.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._request)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def reached(self, step: int) -> bool:
    """Whether to stop after ``step`` (steps done); call after every step, on every process."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None
