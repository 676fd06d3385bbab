"""summary() names the dead units of kernels stored (in, out) and (out, in)."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest

import flipout_jax as flipout


def _mlp_with_dead_hidden_unit(unit=2):
  """An Equinox MLP 4 -> 8 -> 3 (weights stored (out, in)) whose hidden ``unit`` gets no input."""
  model = eqx.nn.MLP(in_size=4, out_size=3, width_size=8, depth=1, key=jax.random.key(0))
  first = model.layers[0].weight.at[unit, :].set(0.0)
  return eqx.tree_at(lambda m: m.layers[0].weight, model, first)


def _units(report):
  return [(l.dead_outputs, l.outputs, l.dead_inputs, l.inputs) for l in report.layers]


def test_equinox_mlp_out_in():
  params = eqx.filter(_mlp_with_dead_hidden_unit(), eqx.is_inexact_array)
  report = flipout.summary(params, kernel_layout="out_in")
  # Layer 0: hidden unit 2 is a dead output of 8 (inputs 4). Layer 1 still reads it (its
  # column 2 is live): 0 of 8 inputs and 0 of 3 outputs dead.
  assert _units(report) == [(1, 8, 0, 4), (0, 3, 0, 8)]
  # The default reads (out, in) kernels as (in, out): units of the wrong sizes.
  assert _units(flipout.summary(params)) == [(0, 4, 1, 8), (0, 8, 0, 3)]


def test_a_callable_layout_per_leaf():
  params = eqx.filter(_mlp_with_dead_hidden_unit(), eqx.is_inexact_array)
  flax_style = {"dense": np.ones((8, 3), np.float32)}  # (in, out)
  mixed = {"eqx": params, "flax": flax_style}
  layout = lambda path, leaf: "out_in" if "eqx" in jax.tree_util.keystr(path) else "in_out"
  report = flipout.summary(mixed, kernel_layout=layout)
  assert _units(report) == [(1, 8, 0, 4), (0, 3, 0, 8), (0, 3, 0, 8)]


def test_conv_kernels_of_both_layouts_agree():
  rng = np.random.default_rng(0)
  hwio = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
  hwio[..., 4] = 0.0  # output filter 4 dead
  hwio[:, :, 1, :] = 0.0  # input channel 1 unused
  oihw = np.transpose(hwio, (3, 2, 0, 1))
  assert _units(flipout.summary({"k": hwio})) == [(1, 7, 1, 5)]
  assert _units(flipout.summary({"k": oihw}, kernel_layout="out_in")) == [(1, 7, 1, 5)]


@pytest.mark.parametrize(
    "layout, error, match",
    [
        ("oi", ValueError, r"kernel_layout must be one of \('in_out', 'out_in'\), got 'oi'"),
        (0, TypeError, "kernel_layout must be one of .* or a callable"),
        (lambda path, leaf: "io", ValueError, r"kernel_layout\(\['w'\], leaf\) must be one of"),
    ],
)
def test_bad_layouts_are_refused(layout, error, match):
  with pytest.raises(error, match=match):
    flipout.summary({"w": np.ones((2, 2), np.float32)}, kernel_layout=layout)


def test_a_summary_is_an_immutable_value():
  params = eqx.filter(_mlp_with_dead_hidden_unit(), eqx.is_inexact_array)
  report = flipout.summary(params, kernel_layout="out_in")
  again = flipout.summary(params, kernel_layout="out_in")
  # Equal params give equal, hashable summaries: usable as dict keys and compared by value.
  assert report == again and hash(report) == hash(again)
  assert {report.layers[0]: "first"}[again.layers[0]] == "first"
  with pytest.raises(dataclasses.FrozenInstanceError):
    report.layers[0].live = 0
  with pytest.raises(dataclasses.FrozenInstanceError):
    report.live = 0
