"""Parameters of a test model, initialised in one compile.

`module.init` called eagerly runs the whole forward pass op by op (each primitive compiled on its
own): about twice the time of one jitted init that keeps only the parameters (XLA drops the
forward's outputs).
"""

import jax


def init_params(module, key, *args, **kwargs):
  """module.init(key, *args, **kwargs)["params"], jitted (args are arrays; kwargs static)."""
  return jax.jit(lambda k, *a: module.init(k, *a, **kwargs)["params"])(key, *args)
