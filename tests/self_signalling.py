"""A test-only wrapper of the experiments' train step that signals its own process after a
chosen step, for child processes of the preemption tests: the step the signal lands on is exact,
no sleeps, no races.

A child runs ``from tests import self_signalling; self_signalling.install()`` before the entry
point; ``SIGNAL_AFTER_STEPS`` (0 or unset: no signal) and ``SIGNAL`` (default ``SIGTERM``)
come from its environment.
"""

import os
import signal

from experiments import train

# The key JAX's preemption sync manager sets in the coordination service once a process has
# seen its notice.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_NOTICE_TIMEOUT_MS = 300_000


def install() -> None:
  """Makes the train step send ``SIGNAL`` to this process after its ``SIGNAL_AFTER_STEPS``-th
  call.

  In a multi-process job the call then waits until the notice is in the coordination service:
  JAX's SIGTERM notifier polls once a second, so without the wait a short run could end before
  the notice is seen, and the step the job stops at would depend on machine load.
  """
  after = int(os.environ.get("SIGNAL_AFTER_STEPS", "0"))
  if not after:
    return
  signum = signal.Signals[os.environ.get("SIGNAL", "SIGTERM")]
  make_train_step = train._make_train_step

  def self_signalling(*args, **kwargs):
    step, calls = make_train_step(*args, **kwargs), [0]

    def counted(*step_args):
      result = step(*step_args)
      calls[0] += 1
      if calls[0] == after:
        os.kill(os.getpid(), signum)
        _wait_for_the_notice()
      return result

    return counted

  train._make_train_step = self_signalling


def _wait_for_the_notice() -> None:
  from jax._src import distributed

  if distributed.global_state.client is not None:
    distributed.global_state.client.blocking_key_value_get(_NOTICE_KEY, _NOTICE_TIMEOUT_MS)
