"""fedsim's own strategies: each module registers a Flower strategy and the client hook it asks for.

Importing this package (``fedsim.server.strategies`` does so on the first name look-up, and
every client process does so before running hooks) fills ``STRATEGIES`` and ``CLIENT_HOOKS``.
"""

from strategies import fedbn, fixbn, scaffold, silobn  # noqa: F401  (registration)
