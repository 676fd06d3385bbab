"""summary() and sparsity() at their limits: empty leaves, and params a stopped run left NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flipout_jax as flipout


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (3, 3, 0, 4), (3, 3, 4, 0)])
def test_summary_of_zero_size_leaves(shape):
  kernel = np.ones((4, 3), np.float32)
  kernel[0] = 0.0
  report = flipout.summary({"empty": np.zeros(shape, np.float32), "kernel": kernel})
  empty, full = report.layers
  assert (empty.shape, empty.size, empty.live, empty.sparsity) == (shape, 0, 0, 0.0)
  assert (empty.outputs, empty.inputs) == (shape[-1], shape[-2])
  assert (full.live, report.size, report.live, report.sparsity) == (9, 12, 9, 0.25)
  assert "empty" in str(report) and report.to_dict()["layers"][0]["size"] == 0


def test_sparsity_without_prunable_entries_is_zero():
  assert flipout.sparsity({"w": np.zeros((0, 5), np.float32)}) == 0.0
  report = flipout.summary({"w": np.zeros((0, 5), np.float32), "b": np.ones(3)})
  assert report.size == 0 and report.sparsity == 0.0
  assert flipout.Summary(layers=(), size=0, live=0).sparsity == 0.0
  str(report)
  assert report.to_dict()["sparsity"] == 0.0


def _misplaced_prune_run():
  """prune FIRST in the chain: the library stops the run with NaN params after its event."""
  rng = np.random.default_rng(0)
  params = {
      "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
      "b": jnp.zeros(6, jnp.float32),
  }
  tx = optax.chain(flipout.prune(0.5, total_steps=6), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(6):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_reports_never_call_a_stopped_run_dense():
  params, state = _misplaced_prune_run()
  assert np.isnan(np.asarray(params["w"])).all()  # the library stopped the run
  with pytest.raises(Exception, match="LAST"):
    flipout.masks(state)
  assert np.isnan(flipout.sparsity(params))
  report = flipout.summary(params)
  (layer,) = report.layers
  assert (layer.non_finite, layer.live, report.non_finite, report.live) == (48, 0, 48, 0)
  assert np.isnan(layer.sparsity) and np.isnan(report.sparsity)
  text = str(report)
  assert "48 prunable weights are NaN/inf" in text and "stopped" in text
  assert text.splitlines()[0].startswith("WARNING")
  as_dict = report.to_dict()
  assert as_dict["non_finite"] == 48 and as_dict["layers"][0]["non_finite"] == 48
  assert np.isnan(as_dict["sparsity"])


def test_a_healthy_report_has_no_warning_and_counts_inf_apart():
  kernel = np.ones((4, 3), np.float32)
  kernel[0] = 0.0
  report = flipout.summary({"w": kernel})
  assert report.non_finite == 0 and "WARNING" not in str(report)
  assert report.to_dict()["non_finite"] == 0
  kernel[1, 1] = np.inf
  kernel[2, 2] = np.nan
  report = flipout.summary({"w": kernel})
  assert (report.live, report.non_finite, report.size) == (7, 2, 12)
  assert np.isnan(report.sparsity) and "2 prunable weights are NaN/inf" in str(report)
  # A NaN or inf weight still connects its units: no unit looks cut off because of it.
  (layer,) = report.layers
  assert (layer.dead_outputs, layer.dead_inputs) == (0, 1)
