"""Sharded params (4 host devices) give the same masks and flip counts as one device.

The device count is fixed when jax starts, so the comparison runs in a child
process with XLA_FLAGS set before jax is imported.

Why this cannot flake on a busy 2-core machine: XLA:CPU runs the 4 devices as
threads that meet in a rendezvous at every collective (the global ranking of an
event sums over all shards). When a participant is still missing
``xla_cpu_collective_call_warn_stuck_timeout_seconds`` (default 20) plus
``xla_cpu_collective_call_terminate_timeout_seconds`` (default 40) after the
first arrived, XLA aborts the whole process (LOG(FATAL), SIGABRT): a wall-clock
deadline on thread scheduling, which the other pytest-xdist worker, other users
and VM steal time can push a thread past on 2 shared cores. (A participant made
65 s late aborts a child with the default flags and not one with these.) The
child raises that deadline far above its own time limit, so the only deadline
left is ``_CHILD_TIMEOUT_S``, which fails readably; and it waits for every step
before dispatching the next, so one program's collectives never queue behind
the next program's work.
"""

import os
import re
import subprocess
import sys
import textwrap

# The child's time limit: the sharded run takes ~5 s alone, ~15 s beside two busy loops.
_CHILD_TIMEOUT_S = 300
_XLA_FLAGS = {
    "xla_force_host_platform_device_count": 4,
    # Longer than _CHILD_TIMEOUT_S: a late thread is waited for, never aborted on.
    "xla_cpu_collective_call_terminate_timeout_seconds": 3600,
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 60,
}
# XLA's defaults, when the flags are absent.
_DEFAULT_TIMEOUTS_S = {
    "xla_cpu_collective_call_warn_stuck_timeout_seconds": 20,
    "xla_cpu_collective_call_terminate_timeout_seconds": 40,
}

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
    # Only elementwise transforms before prune, so both runs see identical updates. The unit
    # structure sums scores over "dense"'s rows, which are sharded: the group sums must not
    # depend on the order the shards add up in.
    chain = lambda prune: optax.chain(
        optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9), prune)
    transforms = {
        "weight": chain(flipout.prune(0.95, total_steps=40)),
        "unit": chain(flipout.prune(0.95, total_steps=40, structure="unit")),
        "2:4": chain(flipout.prune(total_steps=40, structure="2:4")),
    }

    def run(tx, place):
      p = place(params)
      state = jax.jit(tx.init)(p)
      update = jax.jit(tx.update)
      for g in grads:
        u, state = update(place(g), state, p)
        p = optax.apply_updates(p, u)
        # One program in flight at a time: its 4 device threads never wait
        # behind the next step's work.
        p, state = jax.block_until_ready((p, state))
      return p, state

    mesh = Mesh(np.array(jax.devices()), ("x",))
    specs = {"conv": P(None, None, None, "x"), "dense": P("x", None), "bias": P("x")}
    shard = lambda tree: {
        k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
    single = lambda tree: {k: jax.device_put(v, jax.devices()[0]) for k, v in tree.items()}

    for structure, tx in transforms.items():
      sharded_params, sharded_state = run(tx, shard)
      assert len(sharded_params["dense"].sharding.device_set) == 4
      assert len(flipout.masks(sharded_state)["dense"].sharding.device_set) == 4
      plain_params, plain_state = run(tx, single)
      for k in ("conv", "dense"):
        np.testing.assert_array_equal(
            flipout.masks(sharded_state)[k], flipout.masks(plain_state)[k])
        np.testing.assert_array_equal(flipout.flip_counts(sharded_state)[k],
                                      flipout.flip_counts(plain_state)[k])
        np.testing.assert_array_equal(sharded_params[k], plain_params[k])
      report = flipout.summary(sharded_params)
      pruned = report.size - report.live
      if structure == "weight":
        assert pruned == round(0.95 * report.size)
      elif structure == "unit":
        assert pruned >= round(0.95 * report.size)
      else:
        assert pruned == report.size // 2
      print("SHARDED-OK", structure, report.live)
""")


def _child_env() -> dict:
  flags = " ".join(f"--{name}={value}" for name, value in _XLA_FLAGS.items())
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def test_no_collective_deadline_shorter_than_the_childs_own_time_limit():
  # XLA waits the warning timeout, warns, then waits the termination timeout more.
  flags = _child_env()["XLA_FLAGS"]
  abort_after = 0
  for name, default in _DEFAULT_TIMEOUTS_S.items():
    found = re.search(rf"--{name}=(\d+)", flags)
    abort_after += int(found.group(1)) if found else default
  assert abort_after > _CHILD_TIMEOUT_S, flags


def test_sharded_params_give_identical_masks_and_flips():
  try:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=_CHILD_TIMEOUT_S,
    )
  except subprocess.TimeoutExpired as error:
    raise AssertionError(
        f"the 4-device run took over {_CHILD_TIMEOUT_S} s; its stderr ends with:\n"
        f"{(error.stderr or '')[-3000:]}"
    ) from None
  assert result.returncode == 0, result.stderr[-3000:]
  for structure in ("weight", "unit", "2:4"):
    assert f"SHARDED-OK {structure}" in result.stdout, result.stdout
