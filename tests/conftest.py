"""Fixtures shared by test modules: tiny trained runs of the MNIST entry point."""

import pytest

from experiments import mnist

# A few seconds each: 8 steps of 32 synthetic images per epoch, 200 test images.
TINY_RUN = [
    "--model=lenet300",
    "--synthetic",
    "--synthetic_train=256",
    "--synthetic_test=200",
    "--batch_size=32",
    "--eval_batch_size=100",
    "--epochs=2",
    "--no-progress",
    "--no-tensorboard",
]


def train_tiny_run(workdir, *flags) -> str:
  assert mnist.main([*TINY_RUN, f"--workdir={workdir}", *flags]) == 0
  return str(workdir)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
  return train_tiny_run(tmp_path_factory.mktemp("pruned"), "--method=random", "--sparsity=0.99")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  return train_tiny_run(tmp_path_factory.mktemp("dense"), "--method=dense")


@pytest.fixture(scope="session")
def tiny_flipout_run(tmp_path_factory):
  """An uninterrupted ``saved_runs.TINY_FLIPOUT_RUN`` (checkpoints of epochs 1-3); read-only."""
  from tests import saved_runs

  workdir = tmp_path_factory.mktemp("tiny_flipout")
  assert mnist.main([*saved_runs.TINY_FLIPOUT_RUN, f"--workdir={workdir}"]) == 0
  return workdir
