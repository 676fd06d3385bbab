"""A checkpoint write that fails (here: a file-size limit, as a full disk would) ends the run
with one clear error and exit status 4; the previous checkpoint stays and resumes."""

import os
import subprocess
import sys


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
  last_line = child.stderr.splitlines()[-1]
  assert last_line.startswith("python -m experiments.mnist: error: could not save a checkpoint")
  assert "File too large" in last_line
  assert "the newest complete checkpoint (epoch 1) is left as it was" in last_line
  assert checkpoints.load_run(failed).epoch == 1
  assert not (failed / "summary.json").exists()

  assert mnist.main([*_RUN, f"--workdir={failed}", "--resume"]) == 0
  saved_runs.assert_same_final_arrays(tiny_flipout_run, failed)
