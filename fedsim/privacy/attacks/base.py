"""What a membership attack is: the inputs it may read, what it needs, and the registry.

An attack is a class with a static ``scores(inputs, options)`` returning named score arrays
(higher = more likely a member), the run resources it ``needs`` (shadow federations, a
population: :mod:`fedsim.privacy.audits.base`) and, when registered outside fedsim, its
``options`` dataclass, parsed from ``[privacy.mia.plugins.<name>]``. fedsim's own attacks read
their section of ``[privacy.mia]`` (``[privacy.mia.lira]``, ``[privacy.mia.rmia]``). The
membership audit (:mod:`fedsim.privacy.audits.membership`) trains the shadows and scores the
population only when a named attack needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedsim.config import MiaConfig
from fedsim.privacy.audits.base import with_options
from fedsim.registry import Registry


@dataclass(frozen=True)
class MiaInputs:
    """What a membership attack may use, for the pool's n examples at one audited round:
    the target's per-example ``losses`` and LiRA confidences φ = log p_y − log(1 − p_y)
    (so p_y = sigmoid(φ)); with shadows, their φ ``shadow_conf`` and IN masks ``shadow_in``,
    both (k, n); with a population, the target's φ on it (m,) and the shadows' (k, m)."""

    losses: np.ndarray
    confidences: np.ndarray
    shadow_conf: np.ndarray | None = None
    shadow_in: np.ndarray | None = None
    pop_confidences: np.ndarray | None = None
    pop_shadow_conf: np.ndarray | None = None


class MembershipAttack:
    """One membership attack; subclasses set ``needs`` (and ``options`` outside fedsim) and
    implement :meth:`scores`; register with ``@register_attack(name)``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[type | None] = None

    @staticmethod
    def scores(inputs: MiaInputs, options: Any) -> dict[str, np.ndarray]:
        """Membership scores by name (higher: more likely a member), one per sample."""
        raise TypeError("a membership attack defines scores(inputs, options); "
                        "register_attack refuses a class that does not")

    @staticmethod
    def describe(options: Any) -> dict[str, dict]:
        """Its settings as the membership summary reports them: summary key (``mia_pool``,
        ``shadows``) -> fields added there."""
        return {}


MIA_ATTACKS: Registry[type[MembershipAttack]] = Registry("membership attack")


def register_attack(name: str) -> Callable[[type[MembershipAttack]], type[MembershipAttack]]:
    """``@register_attack("name")``: add a :class:`MembershipAttack` under ``name``."""

    def add(cls: type[MembershipAttack]) -> type[MembershipAttack]:
        if not issubclass(cls, MembershipAttack) or cls.scores is MembershipAttack.scores:
            raise TypeError(f"membership attack {name!r} ({cls.__qualname__}) must subclass "
                            "MembershipAttack and define scores(inputs, options)")
        cls.name = name
        return MIA_ATTACKS.register(name)(cls)

    return add


def named_attacks(mia: MiaConfig) -> list[tuple[type[MembershipAttack], Any]]:
    """The attacks ``privacy.mia.attacks`` names, in order, with their options."""
    return with_options(MIA_ATTACKS, mia.attacks, mia, "privacy.mia", "attacks")
