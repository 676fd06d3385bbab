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
import shutil
import signal
import socket
import subprocess
import sys
import time

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
_PROCESS = """
import sys
from experiments import cli, digits
sys.exit(cli.main(sys.argv[1:], digits.DEFAULTS, ("lenet300",)))
"""
_WEIGHT_RTOL, _WEIGHT_ATOL = 1e-4, 1e-5


def _free_port() -> int:
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    return listener.getsockname()[1]


def _start_job(workdir, *extra, args=_ARGS) -> list[subprocess.Popen]:
  """Starts the two processes of one job, their stderr piped."""
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  return [
      subprocess.Popen(
          [sys.executable, "-c", _PROCESS, *args, f"--workdir={workdir}", *extra]
          + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}"],
          env=env,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          text=True,
      )
      for index in range(2)
  ]


def _run_job(workdir, *extra, args=_ARGS) -> None:
  """Runs the two processes of one job to the end; fails with their stderr otherwise."""
  processes = _start_job(workdir, *extra, args=args)
  errors = [process.communicate(timeout=900)[1] for process in processes]
  for process, error in zip(processes, errors):
    assert process.returncode == 0, error


def test_two_processes_train_one_job_like_one_process_and_resume(tmp_path):
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
  assert [
      json.loads(line)["epoch"] for line in (job / "metrics.jsonl").read_text().splitlines()
  ] == [
      1,
      2,
      3,
  ]
  assert sorted(path.name for path in (job / "checkpoints").iterdir() if path.name.isdigit()) == [
      "1",
      "2",
      "3",
  ]

  arrays_job, arrays_one = saved_runs.final_arrays(job), saved_runs.final_arrays(one)
  weights_job, masks_job = arrays_job["params"], arrays_job["masks"]
  weights_one, masks_one = arrays_one["params"], arrays_one["masks"]
  for mask_job, mask_one in zip(masks_job, masks_one, strict=True):
    np.testing.assert_array_equal(mask_job, mask_one)
  for weight_job, weight_one in zip(weights_job, weights_one, strict=True):
    np.testing.assert_allclose(weight_job, weight_one, rtol=_WEIGHT_RTOL, atol=_WEIGHT_ATOL)
  one_summary = json.loads((one / "summary.json").read_text())
  assert abs(summary["test_accuracy"] - one_summary["test_accuracy"]) <= 1 / 360 + 1e-9

  # Resume the job from epoch 1: it must end exactly where it ended uninterrupted.
  for epoch in ("2", "3"):
    shutil.rmtree(job / "checkpoints" / epoch)
  (job / "summary.json").unlink()
  _run_job(job, "--resume")
  arrays_resumed = saved_runs.final_arrays(job)
  weights_resumed, masks_resumed = arrays_resumed["params"], arrays_resumed["masks"]
  for resumed, uninterrupted in zip(weights_resumed + masks_resumed, weights_job + masks_job):
    np.testing.assert_array_equal(resumed, uninterrupted)
  assert json.loads((job / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


# Long enough that a signal sent after the first epoch's log always lands before the end.
_LONG_EPOCHS = 12
_LONG_ARGS = [a for a in _ARGS if not a.startswith("--epochs")] + [f"--epochs={_LONG_EPOCHS}"]


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_ends_like_no_signal(tmp_path):
  job, plain = tmp_path / "job", tmp_path / "plain"
  processes = _start_job(job, args=_LONG_ARGS)
  metrics = job / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
    assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-3000:]
    time.sleep(0.05)
  processes[0].send_signal(signal.SIGTERM)  # a preemptible VM's notice reaches one process
  errors = [p.communicate(timeout=900)[1] for p in processes]
  assert [p.returncode for p in processes] == [75, 75], errors[0][-3000:]
  stopped = [re.search(r"stopped after step (\d+)", e) for e in errors]
  assert stopped[0] and stopped[1] and stopped[0].group(1) == stopped[1].group(1), errors
  assert int(stopped[0].group(1)) < _LONG_EPOCHS * 22  # stopped early: 22 steps an epoch

  for workdir, extra in ((job, ["--resume"]), (plain, [])):
    _run_job(workdir, *extra, args=_LONG_ARGS)
  resumed, uninterrupted = saved_runs.final_arrays(job), saved_runs.final_arrays(plain)
  for kind in ("params", "masks"):
    for got, want in zip(resumed[kind], uninterrupted[kind], strict=True):
      np.testing.assert_array_equal(got, want)
