"""The plugins that register themselves in fedsim's registries when imported.

Registries (``STRATEGIES``, ``CLIENT_HOOKS``) never import what fills them; the edges do,
by importing this module: :mod:`fedsim.validate` (so ``fedsim.run``, the CLI and the sweep
check names against full registries) and the Flower apps' entries (``fedsim.client.app``,
``fedsim.server.app``), which run in their own processes under Ray or the Deployment Engine.
A user's strategy named by import path (``pkg.mod:Class``) registers its client hooks when
:func:`fedsim.server.strategies.strategy_class` imports it.
"""

import fedsim.client.compress  # noqa: F401  client hooks "qsgd", "topk" (upload compressors)
import fedsim.client.failures  # noqa: F401  client hook "crash" (simulated failures)
import strategies  # noqa: F401  fedsim's own strategies and the client hooks they ask for
