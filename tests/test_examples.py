"""Each example trains on a tiny budget, reaches its pruning target and prints summary()."""

import re

import pytest

from examples import equinox_mlp, linen_mlp, nnx_mlp

_STEPS = ["--steps", "24", "--sparsity", "0.9"]  # events at steps 5, 10, 14, 19
# The hidden layer's summary line: its kernel's shape, then 128 output units and 64 inputs
# (Flax kernels are stored (in, out), Equinox ones (out, in): summary() must name both right).
_HIDDEN_LINE = {
    nnx_mlp: r"\['hidden'\]\['kernel'\].*\(64, 128\) .* \d+/128 +\d+/64 ",
    linen_mlp: r"\['hidden'\]\['kernel'\] .*\(64, 128\) .* \d+/128 +\d+/64 ",
    equinox_mlp: r"\.layers\[0\]\.weight .*\(128, 64\) .* \d+/128 +\d+/64 ",
}


def _total_sparsity(printed: str) -> float:
  (total,) = [line for line in printed.splitlines() if line.startswith("total")]
  return float(re.search(r"([\d.]+)%", total).group(1)) / 100


@pytest.mark.parametrize("example", list(_HIDDEN_LINE), ids=lambda module: module.__name__)
def test_example_prunes_to_its_target_and_prints_the_summary(example, capsys):
  assert example.main(_STEPS) == 0
  printed = capsys.readouterr().out
  assert "test accuracy" in printed
  assert _total_sparsity(printed) == pytest.approx(0.9, abs=1e-3)
  assert re.search(_HIDDEN_LINE[example], printed, re.MULTILINE), printed
