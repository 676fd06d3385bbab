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
