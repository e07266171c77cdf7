"""The plugins that register themselves in fedsim's registries when imported.

Registries (``STRATEGIES``, ``CLIENT_HOOKS``, ``AUDITS``, ``MIA_ATTACKS``) never import what
fills them; the edges do, by importing this module: :mod:`fedsim.validate` (so ``fedsim.run``,
the CLI and the sweep check names against full registries) and the Flower apps' entries
(``fedsim.client.app``, ``fedsim.server.app``), which run in their own processes under Ray or
the Deployment Engine. A user's strategy named by import path (``pkg.mod:Class``) registers
its client hooks when :func:`fedsim.server.strategies.strategy_class` imports it.
"""

import fedsim.client.compress  # noqa: F401  client hooks "qsgd", "topk" (upload compressors)
import fedsim.client.failures  # noqa: F401  client hook "crash" (simulated failures)
import fedsim.privacy.attacks.lira  # noqa: F401  membership attack "lira"
import fedsim.privacy.attacks.loss  # noqa: F401  membership attack "loss"
import fedsim.privacy.attacks.rmia  # noqa: F401  membership attack "rmia"
import fedsim.privacy.audits.client_membership  # noqa: F401  privacy audit "client_membership"
import fedsim.privacy.audits.client_mia  # noqa: F401  privacy audit "client_mia"
import fedsim.privacy.audits.exposure  # noqa: F401  privacy audit "exposure"
import fedsim.privacy.audits.inversion  # noqa: F401  privacy audit "inversion"
import fedsim.privacy.audits.leakage  # noqa: F401  privacy audit "leakage"
import fedsim.privacy.audits.membership  # noqa: F401  privacy audit "mia"
import fedsim.privacy.audits.sample_canaries  # noqa: F401  privacy audit "canary_samples"
import fedsim.server.canaries  # noqa: F401  privacy audit "canary_clients"
import strategies  # noqa: F401  fedsim's own strategies and the client hooks they ask for
