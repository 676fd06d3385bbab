"""Sharded params (4 host devices) give the same masks and flip counts as one device.

The device count is fixed when jax starts, so the comparison runs in a child
process with XLA_FLAGS set before jax is imported.
"""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import flipout_jax as flipout
    assert len(jax.devices()) == 4, jax.devices()

    rng = np.random.default_rng(0)
    shapes = {"conv": (3, 3, 8, 16), "dense": (64, 32), "bias": (32,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: (0.5 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
             for _ in range(40)]
    # Only elementwise transforms before prune, so both runs see identical updates.
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9),
                     flipout.prune(0.95, total_steps=40))

    def run(place):
      p = place(params)
      state = jax.jit(tx.init)(p)
      update = jax.jit(tx.update)
      for g in grads:
        u, state = update(place(g), state, p)
        p = optax.apply_updates(p, u)
      return p, state

    mesh = Mesh(np.array(jax.devices()), ("x",))
    specs = {"conv": P(None, None, None, "x"), "dense": P("x", None), "bias": P("x")}
    shard = lambda tree: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
    single = lambda tree: {k: jax.device_put(v, jax.devices()[0]) for k, v in tree.items()}

    sharded_params, sharded_state = run(shard)
    assert len(sharded_params["dense"].sharding.device_set) == 4
    assert len(flipout.masks(sharded_state)["dense"].sharding.device_set) == 4
    plain_params, plain_state = run(single)
    for k in ("conv", "dense"):
      np.testing.assert_array_equal(flipout.masks(sharded_state)[k], flipout.masks(plain_state)[k])
      np.testing.assert_array_equal(flipout.flip_counts(sharded_state)[k],
                                    flipout.flip_counts(plain_state)[k])
      np.testing.assert_array_equal(sharded_params[k], plain_params[k])
    report = flipout.summary(sharded_params)
    assert report.size - report.live == round(0.95 * report.size)
    print("SHARDED-OK", report.live)
""")


def test_sharded_params_give_identical_masks_and_flips():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SHARDED-OK" in result.stdout
