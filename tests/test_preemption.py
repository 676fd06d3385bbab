"""SIGTERM/SIGINT mid-epoch: the run finishes the step, saves it, exits 75 ("preempted"), and
``--resume`` ends bit-identical to an tiny_flipout_run run, metrics included.

The child process signals itself from inside its training loop, right after a chosen step
(``tests/self_signalling.py``, installed by the child's entry code below), so the step the
signal lands on is exact: no sleeps, no races.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from experiments import checkpoints, mnist, preemption
from tests import saved_runs

_STEPS_PER_EPOCH = saved_runs.TINY_FLIPOUT_STEPS_PER_EPOCH
_RUN = saved_runs.TINY_FLIPOUT_RUN
# Runs the MNIST command line with a train step that sends SIGNAL to its own process once
# it has been called SIGNAL_AFTER_STEPS times (tests/self_signalling.py).
_SELF_SIGNALLING_ENTRY = """
import sys
from experiments import mnist
from tests import self_signalling
self_signalling.install()
sys.exit(mnist.main(sys.argv[1:]))
"""


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in lines]


@pytest.mark.parametrize(
    "signal_name, after_steps, every",
    [
        ("SIGTERM", _STEPS_PER_EPOCH + 2, 1),  # mid-epoch 2: a preempted checkpoint
        ("SIGINT", 2 * _STEPS_PER_EPOCH, 0),  # the last step of epoch 2: its epoch checkpoint
    ],
)
def test_a_signal_saves_the_step_and_resume_ends_like_an_tiny_flipout_run_run(
    tiny_flipout_run, tmp_path, signal_name, after_steps, every
):
  argv = [*_RUN, f"--checkpoint_every_epochs={every}", f"--workdir={tmp_path}"]
  child = subprocess.run(
      [sys.executable, "-c", _SELF_SIGNALLING_ENTRY, *argv],
      env={
          **os.environ,
          "JAX_PLATFORMS": "cpu",
          "SIGNAL": signal_name,
          "SIGNAL_AFTER_STEPS": str(after_steps),
      },
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert child.returncode == preemption.EXIT_PREEMPTED == 75, child.stderr
  assert child.stderr.splitlines()[-1].endswith(
      f"preempted: stopped after step {after_steps} (step {after_steps % _STEPS_PER_EPOCH} of "
      f"{_STEPS_PER_EPOCH} in epoch {after_steps // _STEPS_PER_EPOCH + 1}) and saved a "
      "checkpoint there; continue with --resume"
  ), child.stderr
  assert "Traceback" not in child.stderr
  assert not (tmp_path / "summary.json").exists()
  saved_epochs = sorted(p.name for p in (tmp_path / checkpoints.CHECKPOINT_DIR).iterdir())
  preempted = sorted(p.name for p in (tmp_path / checkpoints.PREEMPTED_DIR).iterdir())
  if after_steps % _STEPS_PER_EPOCH:
    assert (saved_epochs, preempted) == (["1"], [str(after_steps)])
  else:  # at an epoch's end the epoch checkpoint is saved, even off the checkpoint period
    assert (saved_epochs, preempted) == (["2"], [])
  assert len(_records(tmp_path)) == after_steps // _STEPS_PER_EPOCH

  assert mnist.main([*argv, "--resume"]) == 0
  saved_runs.assert_same_final_arrays(tiny_flipout_run, tmp_path)
  assert _records(tmp_path) == _records(tiny_flipout_run)


def test_the_watch_turns_a_signal_into_a_stop_request_and_restores_the_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watch() as watch:
    assert not watch.reached(1)
    # Only once the handler is ours: the default action of SIGTERM would end pytest.
    assert signal.getsignal(signal.SIGTERM) == watch._request
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2) and watch.signal == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
