"""A run killed with SIGKILL and resumed ends bit-exactly where an uninterrupted run ends."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from experiments import checkpoints, cli, digits
from tests import saved_runs

# The digits demo's recipe through the shared command line, in a fresh interpreter.
_ENTRY = (
    "import sys; from experiments import cli, digits; "
    "sys.exit(cli.main(sys.argv[1:], digits.DEFAULTS, ('lenet300',)))"
)
# 12 epochs of 22 steps; 90% needs 4 FlipOut events (steps 53, 106, 158, 211), so the kill
# after epoch 3 lands before most of them. Gradient noise makes every step random.
_ARGS = [
    "--method=flipout",
    "--sparsity=0.9",
    "--epochs=12",
    "--checkpoint_every_epochs=1",
    "--keep_checkpoints=3",
    "--no-progress",
    "--tensorboard",
]
_KILL_AFTER_EPOCH = 3


def _command(workdir, *extra):
  return [sys.executable, "-c", _ENTRY, *_ARGS, f"--workdir={workdir}", *extra]


def _main(workdir, *extra) -> int:
  """The same command line as :func:`_command`, run in this interpreter."""
  return cli.main([*_ARGS, f"--workdir={workdir}", *extra], digits.DEFAULTS, ("lenet300",))


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _kill_after_checkpoint(workdir, epoch):
  """Starts a run and SIGKILLs it as soon as the checkpoint of ``epoch`` is complete."""
  process = subprocess.Popen(
      _command(workdir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  # Orbax renames the temporary folder to <epoch> only once the write is complete.
  finished = workdir / "checkpoints" / str(epoch)
  deadline = time.monotonic() + 300
  while not finished.is_dir():
    assert process.poll() is None, process.stderr.read().decode()
    assert time.monotonic() < deadline, "no checkpoint within 300 s"
    time.sleep(0.01)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  return process.returncode


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, capsys):
  # Only the killed run needs a process of its own (SIGKILL); the uninterrupted run and the
  # resume run in this interpreter, which saves starting two more.
  killed = tmp_path / "killed"
  assert _kill_after_checkpoint(killed, _KILL_AFTER_EPOCH) == -signal.SIGKILL
  assert not (killed / "summary.json").exists(), "the run ended before it was killed"
  epochs_before_resume = len((killed / "metrics.jsonl").read_text().splitlines())
  assert _KILL_AFTER_EPOCH <= epochs_before_resume < 12

  capsys.readouterr()
  assert _main(killed, "--resume", "--progress") == 0
  resumed_out = capsys.readouterr().out
  resumed_from = int(resumed_out.split("resuming after epoch ")[1].split()[0])
  assert _KILL_AFTER_EPOCH <= resumed_from <= epochs_before_resume
  assert f"epoch {resumed_from}/12:" not in resumed_out  # no epoch is trained twice
  assert f"epoch {resumed_from + 1}/12:" in resumed_out

  uninterrupted = tmp_path / "uninterrupted"
  assert _main(uninterrupted) == 0

  expected, actual = saved_runs.final_arrays(uninterrupted), saved_runs.final_arrays(killed)
  for name in ("params", "masks", "flips"):
    assert len(actual[name]) == len(expected[name]) > 0
    for got, want in zip(actual[name], expected[name]):
      np.testing.assert_array_equal(got, want, err_msg=name)
  assert sum(int(flips.sum()) for flips in actual["flips"]) > 0  # flips were counted at all
  records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert [record["epoch"] for record in records] == list(range(1, 13))
  summaries = [json.loads((run / "summary.json").read_text()) for run in (killed, uninterrupted)]
  assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
  assert summaries[0]["sparsity"] == summaries[1]["sparsity"] == 0.9

  # A write cut short leaves orbax's temporary folder, never renamed: it is not a checkpoint.
  partial = killed / "checkpoints" / "13.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(killed / "checkpoints" / "12", partial)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"truncated")
  assert checkpoints.load_run(killed).epoch == 12
  for name, arrays in saved_runs.final_arrays(killed).items():
    for got, want in zip(arrays, expected[name]):
      np.testing.assert_array_equal(got, want, err_msg=name)
