"""Reading a trained run back for comparisons between runs."""

import jax
import numpy as np
from flax import nnx

from experiments import checkpoints


def final_arrays(workdir) -> dict[str, list[np.ndarray]]:
  """Params, masks and flip counts of the newest checkpoint, as flat lists of arrays."""
  run = checkpoints.load_run(workdir)
  params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
  return {
      name: [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
      for name, tree in (("params", params), ("masks", run.masks), ("flips", run.flip_counts))
  }


# A 3-epoch FlipOut run of LeNet-300 on 64 synthetic images, 4 steps per epoch: seconds to
# train, with pruning events and gradient noise, for the fault-tolerance tests.
TINY_FLIPOUT_STEPS_PER_EPOCH = 4
TINY_FLIPOUT_RUN = [
    "--synthetic",
    "--synthetic_train=64",
    "--synthetic_test=16",
    "--batch_size=16",
    "--method=flipout",
    "--sparsity=0.5",
    "--epochs=3",
    "--no-progress",
    "--no-tensorboard",
]


def assert_same_final_arrays(expected_workdir, actual_workdir) -> None:
  """The newest checkpoints of two runs hold bit-identical params, masks and flip counts."""
  expected, actual = final_arrays(expected_workdir), final_arrays(actual_workdir)
  for name in ("params", "masks", "flips"):
    assert len(actual[name]) == len(expected[name]) > 0, name
    for got, want in zip(actual[name], expected[name]):
      np.testing.assert_array_equal(got, want, err_msg=name)
