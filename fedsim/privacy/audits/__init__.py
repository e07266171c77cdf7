"""Privacy audits of a federated run as a registry: one module per audit, each with its own
``[privacy.<name>]`` section and checkpoint state (:mod:`~fedsim.privacy.audits.base`), run
together by :class:`~fedsim.privacy.audits.suite.AuditSuite`.

fedsim's own audits: ``mia`` (:mod:`~fedsim.privacy.audits.membership`), ``client_mia``
(:mod:`~fedsim.privacy.audits.client_mia`), ``client_membership``
(:mod:`~fedsim.privacy.audits.client_membership`), ``leakage``
(:mod:`~fedsim.privacy.audits.leakage`), ``inversion`` (:mod:`~fedsim.privacy.audits.inversion`),
``canary_samples`` (:mod:`~fedsim.privacy.audits.sample_canaries`), ``exposure``
(:mod:`~fedsim.privacy.audits.exposure`, text) and ``canary_clients``
(:mod:`fedsim.server.canaries`, a server mechanism). This package never imports them: they
register when :mod:`fedsim.plugins` does.
"""

from fedsim.privacy.audits.base import (
    AUDITS,
    NEEDS,
    Audit,
    AuditContext,
    RoundView,
    Upload,
    register_audit,
)
from fedsim.privacy.audits.suite import AuditSuite, check_names, check_run

__all__ = ["AUDITS", "NEEDS", "Audit", "AuditContext", "AuditSuite", "RoundView", "Upload",
           "check_names", "check_run", "register_audit"]
