"""Imagenette experiments: ``python -m experiments.imagenette --model=densenet121``.

With no flag this is the paper's DenseNet121 run at 99.9% sparsity: 224x224 images, random
crop with zero padding 28 and horizontal flip, and the CIFAR recipe (SGD 0.1, momentum 0.9,
coupled weight decay 5e-4, learning rate x0.1 after epochs 150 and 250, 350 epochs, batch
128, noise 1, p = 2, rate 0.5), as in the authors' Imagenette job script. The data set must
be prepared for ``tfds.data_source`` first (the error message says how).
"""

import dataclasses
import sys

from experiments import cifar, cli

MODELS = ("densenet121",)

# The CIFAR recipe on 224x224 Imagenette (the authors' job script: same optimizer, schedule,
# batch and pruning settings; their test batch was 500).
DEFAULTS = dataclasses.replace(
    cifar.DEFAULTS, dataset="imagenette", model="densenet121", eval_batch_size=500
)


def main(argv=None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  return cli.main(argv, DEFAULTS, MODELS, prog="python -m experiments.imagenette")


if __name__ == "__main__":
  sys.exit(main())
