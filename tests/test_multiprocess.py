"""Two processes on this machine form one data-parallel job through jax.distributed (CPU
collectives over the loopback address), and prune exactly like one process.

Tolerance: the job splits each global batch of 64 over the two processes, so the gradient sum
is rounded in another order than in one process; over 66 float32 steps the weights agree to
rounding level (rtol 1e-4, atol 1e-5, as in the 1-vs-4-device test), the masks exactly, and
the test accuracy within one of the 360 test images.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

from experiments import cli, digits
from tests import saved_runs

_ARGS = [
    "--method=flipout",
    "--sparsity=0.9",
    "--epochs=3",
    "--batch_size=64",
    "--keep_checkpoints=5",
    "--checkpoint_every_epochs=1",
    "--no-progress",
    "--no-tensorboard",
]
# Process 0 may signal itself (SIGTERM, as a preemptible VM's notice reaching one process)
# right after its SIGNAL_AFTER_STEPS-th train step (tests/self_signalling.py).
_PROCESS = """
import sys
from experiments import cli, digits
if "--process_id=0" in sys.argv:
  from tests import self_signalling
  self_signalling.install()
sys.exit(cli.main(sys.argv[1:], digits.DEFAULTS, ("lenet300",)))
"""
_STEPS_PER_EPOCH = 22  # 1,437 digits in the train split, batch 64
_WEIGHT_RTOL, _WEIGHT_ATOL = 1e-4, 1e-5


def _free_port() -> int:
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    return listener.getsockname()[1]


def _start_job(workdir, *extra, signal_after_steps=0) -> list[subprocess.Popen]:
  """Starts the two processes of one job, their stderr piped."""
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "SIGNAL_AFTER_STEPS": str(signal_after_steps)}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  return [
      subprocess.Popen(
          [sys.executable, "-c", _PROCESS, *_ARGS, f"--workdir={workdir}", *extra]
          + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}"],
          env=env,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for index in range(2)
  ]


def _run_job(workdir, *extra) -> None:
  """Runs the two processes of one job to the end; fails with their stderr otherwise."""
  processes = _start_job(workdir, *extra)
  errors = [process.communicate(timeout=900)[1] for process in processes]
  for process, error in zip(processes, errors):
    assert process.returncode == 0, error


def test_two_processes_train_like_one_process_and_stop_together_and_resume_exactly(tmp_path):
  """One test, three two-process jobs (each costs two interpreters and a compile): the job
  uninterrupted, against one process; the same job preempted on one process and resumed, against
  the uninterrupted job."""
  job = tmp_path / "job"
  _run_job(job)
  one = tmp_path / "one"
  assert cli.main([*_ARGS, f"--workdir={one}"], digits.DEFAULTS, ("lenet300",)) == 0

  summary = json.loads((job / "summary.json").read_text())
  assert summary["devices"] == 2  # one device in each process, one mesh
  assert summary["live_weights"] == summary["prunable_weights"] - round(
      0.9 * summary["prunable_weights"]
  )
  # One log and one checkpoint per epoch, written once (not once per process).
  logged = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
  assert [record["epoch"] for record in logged] == [1, 2, 3]
  checkpoints = sorted(path.name for path in (job / "checkpoints").iterdir() if path.name.isdigit())
  assert checkpoints == ["1", "2", "3"]

  arrays_job, arrays_one = saved_runs.final_arrays(job), saved_runs.final_arrays(one)
  weights_job, masks_job = arrays_job["params"], arrays_job["masks"]
  weights_one, masks_one = arrays_one["params"], arrays_one["masks"]
  for mask_job, mask_one in zip(masks_job, masks_one, strict=True):
    np.testing.assert_array_equal(mask_job, mask_one)
  for weight_job, weight_one in zip(weights_job, weights_one, strict=True):
    np.testing.assert_allclose(weight_job, weight_one, rtol=_WEIGHT_RTOL, atol=_WEIGHT_ATOL)
  one_summary = json.loads((one / "summary.json").read_text())
  assert abs(summary["test_accuracy"] - one_summary["test_accuracy"]) <= 1 / 360 + 1e-9

  # SIGTERM to process 0 alone, mid-epoch 2: both stop after one agreed step and save it.
  preempted = tmp_path / "preempted"
  processes = _start_job(preempted, signal_after_steps=_STEPS_PER_EPOCH + 2)
  errors = [p.communicate(timeout=900)[1] for p in processes]
  assert [p.returncode for p in processes] == [75, 75], errors[0][-3000:]
  stopped = [re.search(r"stopped after step (\d+)", e) for e in errors]
  assert stopped[0] and stopped[1] and stopped[0].group(1) == stopped[1].group(1), errors
  # Process 1 dispatches steps ahead until the host waits for epoch 2's totals (step 44), so the
  # agreed step (the furthest step reported, plus one) is in 25..45, before the run's end.
  assert _STEPS_PER_EPOCH + 2 < int(stopped[0].group(1)) <= 2 * _STEPS_PER_EPOCH + 1
  assert not (preempted / "summary.json").exists()

  # Resumed, it ends bit-identical to the job never interrupted.
  _run_job(preempted, "--resume")
  resumed = saved_runs.final_arrays(preempted)
  for kind in ("params", "masks"):
    for got, want in zip(resumed[kind], arrays_job[kind], strict=True):
      np.testing.assert_array_equal(got, want)
  resumed_summary = json.loads((preempted / "summary.json").read_text())
  assert resumed_summary["test_accuracy"] == summary["test_accuracy"]
