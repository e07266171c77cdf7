"""fedsim's own strategies: each module registers a Flower strategy and the client hook it asks for.

Importing this package fills ``STRATEGIES`` and ``CLIENT_HOOKS``; :mod:`fedsim.plugins` does
so for every run (and for every Flower app process), the registries themselves never do.
"""

from strategies import fedbn, fixbn, scaffold, silobn  # noqa: F401  (registration)
