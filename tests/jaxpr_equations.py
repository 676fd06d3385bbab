"""Reading traced programs in tests."""


def equations(jaxpr):
  """Every equation of a jaxpr, including those of cond branches and loops."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from equations(sub)
