"""Compaction of any pruned JAX function into a smaller dense one (see README.md here).

The package's interface to the rest of the library: :func:`compact` and its results, and
:func:`param_units` for pruning by units. Nothing else in ``flipout_jax._src`` imports its
modules directly (``tests/test_layering.py``).
"""

from flipout_jax._src.compact.api import Compacted as Compacted
from flipout_jax._src.compact.api import CompactionReport as CompactionReport
from flipout_jax._src.compact.api import LayerCompaction as LayerCompaction
from flipout_jax._src.compact.api import compact as compact
from flipout_jax._src.compact.units import ParamUnits as ParamUnits
from flipout_jax._src.compact.units import param_units as param_units
from flipout_jax._src.compact.flop_count import flops as flops
from flipout_jax._src.compact.units import LinearTerm as LinearTerm
from flipout_jax._src.compact.activations import activation_norms as activation_norms
