"""A checkpoint write that fails (here: a file-size limit, as a full disk would) ends the run
with one clear error and exit status 4; the previous checkpoint stays and resumes."""

import logging
import os
import subprocess
import sys

import pytest
from experiments import checkpoints, cli, mnist
from tests import saved_runs

_RUN = saved_runs.TINY_FLIPOUT_RUN
# The MNIST command line whose writes fail past 100 kB (EFBIG, no root needed) from the save
# of epoch 2 on: that checkpoint's data files are larger, metrics.jsonl is not.
_SIZE_LIMITED_ENTRY = """
import resource, signal, sys
from experiments import checkpoints, mnist
save_to_store = checkpoints.save_to_store
def size_limited(store, orbax_step, *args, **kwargs):
  if orbax_step == 2:
    store.epochs.wait_until_finished()  # epoch 1's asynchronous write is complete
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
  return save_to_store(store, orbax_step, *args, **kwargs)
checkpoints.save_to_store = size_limited
sys.exit(mnist.main(sys.argv[1:]))
"""


def test_a_failed_save_is_one_error_and_the_previous_checkpoint_resumes(tiny_flipout_run, tmp_path):
  failed = tmp_path / "failed"
  child = subprocess.run(
      [sys.executable, "-c", _SIZE_LIMITED_ENTRY, *_RUN, f"--workdir={failed}"],
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert child.returncode == cli.EXIT_SAVE_FAILED == 4, child.stderr
  # One line: none of the tracebacks orbax's threads log, asyncio's abandoned tasks or
  # tensorstore's late callbacks, whenever they come.
  [last_line] = child.stderr.splitlines()
  assert last_line.startswith("python -m experiments.mnist: error: could not save a checkpoint")
  assert "File too large" in last_line
  assert "the newest complete checkpoint (epoch 1) is left as it was" in last_line
  assert checkpoints.load_run(failed).epoch == 1
  assert not (failed / "summary.json").exists()

  assert mnist.main([*_RUN, f"--workdir={failed}", "--resume"]) == 0
  saved_runs.assert_same_final_arrays(tiny_flipout_run, failed)


def _orbax_error_record(logger: logging.Logger) -> logging.LogRecord:
  path = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "manager.py")
  return logger.makeRecord(logger.name, logging.ERROR, path, 1, "write failed", None, None)


def test_orbax_errors_are_held_until_a_run_that_saved_ends_and_dropped_when_a_save_failed(caplog):
  logger = logging.getLogger("absl")
  with checkpoints.held_write_errors():
    logger.handle(_orbax_error_record(logger))
    logger.error("not from orbax")  # this module's records pass at once
    assert [record.getMessage() for record in caplog.records] == ["not from orbax"]
  assert [record.getMessage() for record in caplog.records] == ["not from orbax", "write failed"]

  caplog.clear()
  with pytest.raises(checkpoints.CheckpointSaveError):
    with checkpoints.held_write_errors():
      logger.handle(_orbax_error_record(logger))
      raise checkpoints.CheckpointSaveError("could not save")
  assert caplog.records == []
  logger.handle(_orbax_error_record(logger))  # the filter is gone once the run has ended
  assert [record.getMessage() for record in caplog.records] == ["write failed"]


def test_a_shortened_save_error_keeps_the_operating_system_reason():
  # tensorstore's message can end with a long spec of the store: cutting the middle of it
  # dropped "File too large" from the line once (CI).
  middle = "Failed to write 885987 bytes to file 11: File too large [os_error_code='27']"
  spec = "; spec=" + '{"driver":"ocdbt","base":"file:///tmp/run/checkpoints/2"}' * 20
  message = "OUT_OF_RANGE: Error writing " + "x" * 300 + ": " + middle + spec
  shortened = checkpoints._shortened(ValueError(message))
  assert "File too large [os_error_code='27']" in shortened and len(shortened) < 600
  assert shortened.startswith("OUT_OF_RANGE: Error writing")
  short = "OUT_OF_RANGE: disk full"
  assert checkpoints._shortened(ValueError(short)) == short
  # Only the code kept: the reason is named from it.
  coded = "OUT_OF_RANGE: Error writing " + "y" * 500 + " [os_error_code='27']) " + "z" * 300
  assert "(File too large)" in checkpoints._shortened(ValueError(coded))
