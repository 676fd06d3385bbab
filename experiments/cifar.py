"""CIFAR-10 experiments: ``python -m experiments.cifar --model=vgg19``.

With no flag this is the paper's VGG19 run at 99.9% sparsity (``shared/FLIPOUT.md``, "Paper
training recipe"): SGD with learning rate 0.1, momentum 0.9, coupled weight decay 5e-4,
learning rate x0.1 after epochs 150 and 250, 350 epochs, batch 128, random crop (pad 4) and
horizontal flip, per-channel normalisation, gradient noise 1, p = 2, prune rate 0.5, and
PyTorch's default initialisation (``--init=torch``), as the authors' models. Every
other flag is described by ``--help`` (see ``experiments/config.py``).
"""

import sys

from experiments import cli
from experiments import config as config_lib

MODELS = ("vgg11", "vgg13", "vgg16", "vgg19", "resnet18")

# Config's defaults are this run (the paper's VGG19 at 99.9%): nothing to override.
DEFAULTS = config_lib.Config()


def main(argv=None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  return cli.main(argv, DEFAULTS, MODELS, prog="python -m experiments.cifar")


if __name__ == "__main__":
  sys.exit(main())
