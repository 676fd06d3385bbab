"""prune with 2**31 or more prunable weights, traced abstractly (nothing is allocated)."""

import jax
import jax.numpy as jnp
import pytest

import flipout_jax as flipout
from tests import jaxpr_equations

_LIMIT = 2**31 - 1  # a Mersenne prime: (_LIMIT, 1) is the largest leaf int32 counts allow


def _abstract(*shapes):
  return {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.float32) for i, shape in enumerate(shapes)}


def _trace_update(tx, params):
  state = jax.eval_shape(tx.init, params)
  return jax.eval_shape(tx.update, params, state, params)


@pytest.mark.parametrize(
    "make,shapes",
    [
        (lambda: flipout.prune(0.9, total_steps=100), [(2**16, 2**14), (2**16, 2**14)]),
        (
            lambda: flipout.prune(criterion="random", schedule=flipout.halving(every=10)),
            [(2**16, 2**14), (2**31, 1)],
        ),
        # Layer-wise magnitude ranks each leaf alone: only a leaf's size counts.
        (
            lambda: flipout.prune(criterion="magnitude", schedule=flipout.halving(every=10)),
            [(2, 3), (2**16, 2**15)],
        ),
    ],
)
def test_too_many_weights_without_x64_is_refused_at_init(make, shapes):
  with pytest.raises(ValueError, match=r"2\*\*31 - 1 prunable weights.*jax_enable_x64"):
    jax.eval_shape(make().init, _abstract(*shapes))


# Flip counters are uint16 where the last event is at step 65535 or earlier
# (tests/test_flip_counters.py), whatever the number of weights.
@pytest.mark.parametrize(
    "make,shapes,flips_dtype",
    [
        (lambda: flipout.prune(0.9, total_steps=100), [(_LIMIT, 1)], jnp.uint16),
        (
            lambda: flipout.prune(criterion="magnitude", schedule=flipout.halving(every=10)),
            [(2**15, 2**15)] * 3,
            jnp.int32,
        ),
        # prune_below counts nothing.
        (lambda: flipout.prune_below(0.1, step=3), [(2**16, 2**15), (7, 3)], jnp.uint16),
    ],
)
def test_counts_that_fit_int32_trace_without_x64(make, shapes, flips_dtype):
  updates, state = _trace_update(make(), _abstract(*shapes))
  assert updates["w0"].shape == shapes[0] and state.flips["w0"].dtype == flips_dtype


@pytest.mark.parametrize(
    "make,flips_dtype",
    [
        (lambda: flipout.prune(0.9, total_steps=100), jnp.uint16),
        (
            lambda: flipout.prune(
                target_sparsity=0.99, schedule=flipout.halving(rate=0.3, every=10)
            ),
            jnp.int32,
        ),
        (
            lambda: flipout.prune(criterion="magnitude", schedule=flipout.halving(every=10)),
            jnp.int32,
        ),
        (lambda: flipout.prune(0.5, total_steps=10, criterion="random"), jnp.uint16),
    ],
)
def test_more_than_2_31_weights_trace_with_x64(make, flips_dtype):
  with jax.enable_x64(True):
    params = _abstract((2**16, 2**15), (3, 2**30 + 1))  # 5 * 2**30 + 3 weights
    updates, state = _trace_update(make(), params)
    assert updates["w1"].shape == (3, 2**30 + 1) and updates["w1"].dtype == jnp.float32
    assert state.masks["w0"].dtype == jnp.bool_ and state.flips["w1"].dtype == flips_dtype


def test_counts_over_2_31_weights_are_int64():
  # Two leaves of 2**30 + 1 weights: each leaf's count fits int32, their sum
  # does not, so every count (sums and cumulative sums) must be int64.
  with jax.enable_x64(True):
    params = _abstract((2**15, 2**15 + 2), (2**15 + 2, 2**15))
    tx = flipout.prune(0.9, total_steps=100)
    state = jax.eval_shape(tx.init, params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
    counts = [
        e for e in jaxpr_equations.equations(jaxpr) if e.primitive.name in ("reduce_sum", "cumsum")
    ]
    assert counts and all(e.outvars[0].aval.dtype == jnp.int64 for e in counts), {
        e.primitive.name: e.outvars[0].aval.dtype for e in counts
    }


@pytest.mark.parametrize(
    "target, rate, events",
    [(0.0, 0.5, 0), (0.5, 0.5, 1), (0.75, 0.5, 2), (0.76, 0.5, 3), (0.999, 0.5, 10)],
)
def test_num_events_for_is_the_fewest_events_that_reach_the_target(target, rate, events):
  # 1 - (1 - rate)**k >= target: no event for a dense target, one event for a target one
  # event reaches exactly, one more for anything beyond.
  assert flipout.num_events_for(target, rate) == events
