"""Each example trains on a tiny budget, reaches its pruning target, prints summary(), compacts
the pruned model to fewer parameters with the same logits, and exports it with jax.export."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipout_jax as flipout
from examples import _digits, equinox_mlp, gpt_compact, linen_mlp, nnx_cnn_faster, nnx_mlp

_STEPS = ["--steps", "24", "--sparsity", "0.9"]  # events at steps 5, 10, 14, 19
# The hidden layer's summary line: its kernel's shape, then 128 output units and 64 inputs
# (Flax kernels are stored (in, out), Equinox ones (out, in): summary() must name both right).
_HIDDEN_LINE = {
    nnx_mlp: r"\['hidden'\]\['kernel'\].*\(64, 128\) .* \d+/128 +\d+/64 ",
    linen_mlp: r"\['hidden'\]\['kernel'\] .*\(64, 128\) .* \d+/128 +\d+/64 ",
    equinox_mlp: r"\.layers\[0\]\.weight .*\(128, 64\) .* \d+/128 +\d+/64 ",
}
_NUMBER = r"([\d,]+)"  # as the report prints counts: 9,610
_DIFF = r"max \|logits - pruned logits\| (\S+) \(tolerance (\S+)\)"
_PARAMETERS = 64 * 128 + 128 + 128 * 10 + 10  # the dense MLP's kernels and biases


def _total_sparsity(printed: str) -> float:
  (total,) = [line for line in printed.splitlines() if line.startswith("total")]
  return float(re.search(r"([\d.]+)%", total).group(1)) / 100


def _found(pattern: str, printed: str) -> tuple[str, ...]:
  """The groups of the line of ``printed`` that starts with ``pattern``, commas dropped."""
  match = re.search("^" + pattern, printed, re.MULTILINE)
  assert match, f"no line matches {pattern!r} in\n{printed}"
  return tuple(group.replace(",", "") for group in match.groups())


def _assert_compacted(printed: str) -> None:
  """The report's widths and parameter totals, and the logit checks, as the example printed."""
  # The report's first layer, the hidden one: 64 inputs kept, 128 outputs down to `hidden`.
  (hidden,) = map(int, _found(rf"\S+ +64 -> 64 +128 -> {_NUMBER} ", printed))
  dense, compact = map(int, _found(rf"parameters: {_NUMBER} -> {_NUMBER} ", printed))
  # Tiny training at 90% leaves dead hidden units, and the compact params are their width.
  assert 0 < hidden < 128
  assert (dense, compact) == (_PARAMETERS, 64 * hidden + hidden + hidden * 10 + 10)
  (size,) = map(int, _found(rf"exported: {_NUMBER} bytes", printed))
  assert size > 0
  for what in ("compact", "exported"):
    diff, limit = map(float, _found(f"{what}: {_DIFF}", printed))
    # 1e-5 of the largest logit, below 100 here: a loosened tolerance fails too.
    assert diff <= limit <= 1e-3, printed


@pytest.mark.parametrize("example", list(_HIDDEN_LINE), ids=lambda module: module.__name__)
def test_example_prunes_compacts_and_exports(example, capsys):
  assert example.main(_STEPS) == 0
  printed = capsys.readouterr().out
  assert "test accuracy" in printed
  assert _total_sparsity(printed) == pytest.approx(0.9, abs=1e-3)
  assert re.search(_HIDDEN_LINE[example], printed, re.MULTILINE), printed
  _assert_compacted(printed)


def _tiny_compacted() -> tuple[flipout.Compacted, jax.Array, jax.Array]:
  """A 64 -> 4 -> 10 model with one dead hidden unit, compacted, its logits and inputs."""
  kernel = jnp.ones((64, 4)).at[:, 3].set(0.0)
  params = {"hidden": kernel, "out": jnp.ones((4, 10))}
  apply_fn = lambda params, x: jax.nn.relu(x @ params["hidden"]) @ params["out"]
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 64)), jnp.float32)
  return flipout.compact(apply_fn, params, x), apply_fn(params, x), x


def test_exported_bytes_run_the_compact_model_at_another_batch_size():
  compacted, logits, x = _tiny_compacted()
  assert compacted.params["hidden"].shape == (64, 3)
  blob = _digits.check_and_export(compacted, logits, x)
  # The export's batch size is symbolic: the bytes alone run the compact model on 2 images.
  np.testing.assert_allclose(jax.export.deserialize(blob).call(x[:2]), logits[:2], rtol=1e-6)


def test_check_and_export_refuses_a_compact_model_with_other_logits():
  compacted, logits, x = _tiny_compacted()
  wrong = compacted._replace(params={**compacted.params, "out": compacted.params["out"] * 1.001})
  with pytest.raises(SystemExit, match="compact logits differ"):
    _digits.check_and_export(wrong, logits, x)


def test_check_and_export_refuses_an_export_with_other_logits(monkeypatch):
  compacted, logits, x = _tiny_compacted()
  deserialize = jax.export.deserialize

  class Shifted:  # what a broken serialization would give back: other logits

    def __init__(self, blob):
      self.exported = deserialize(blob)

    def call(self, *args):
      return self.exported.call(*args) + 1e-2

  monkeypatch.setattr(jax.export, "deserialize", Shifted)
  with pytest.raises(SystemExit, match="exported logits differ"):
    _digits.check_and_export(compacted, logits, x)


def test_gpt_example_prunes_mlp_units_compacts_exports_and_generates_the_same_tokens(capsys):
  assert gpt_compact.main(["--steps", "40", "--sparsity", "0.5"]) == 0
  printed = capsys.readouterr().out
  assert "generates the same tokens: True" in printed
  # Both blocks' MLPs lose about half their 128 hidden units, in fc's outputs and out's inputs.
  for block in (0, 1):
    (kept,) = map(
        int, _found(rf"\['blocks'\]\[{block}\]\['fc'\]\S* +32 -> 32 +128 -> (\d+)", printed)
    )
    assert 48 <= kept <= 80, printed
    assert re.search(rf"\['blocks'\]\[{block}\]\['out'\]\S* +128 -> {kept} ", printed), printed


def test_cnn_example_reaches_its_flop_target_in_multiples_of_eight(capsys):
  assert nnx_cnn_faster.main(["--steps", "40", "--flops", "0.8"]) == 0
  printed = capsys.readouterr().out
  (removed,) = map(float, _found(r"FLOPs removed: (\S+)", printed))
  # In blocks of 8, conv1's channels are coarse: 8 of them take 8 of conv2's inputs too,
  # about 11% of the FLOPs at conv2's widths here, so the nearest block lands within 6%.
  assert abs(removed - 0.8) <= 0.06, printed
  for layer in ("conv1", "conv2", "hidden"):
    (kept,) = map(int, _found(rf"\['{layer}'\]\S* +\S+ -> \S+ +\d+ -> (\d+) ", printed))
    assert 0 < kept and kept % 8 == 0, printed
  assert re.search(r"^batch 1000 on \w+: dense .* ms, compact .* ms, .*x faster", printed, re.M)
  diff, limit = map(float, _found(f"compact: {_DIFF}", printed))
  assert diff <= limit, printed
