"""The loss-threshold attack (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018):
members have lower loss, so the score is ``-loss``. It needs nothing but the target model."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.privacy.attacks.base import MembershipAttack, MiaInputs, register_attack


def loss_attack(losses: np.ndarray) -> np.ndarray:
    """Loss-threshold attack (Yeom et al. 2018): score = −loss, so low loss reads as member."""
    return -np.asarray(losses, dtype=np.float64)


@register_attack("loss")
class Loss(MembershipAttack):
    """Reported as ``mia.loss``."""

    @staticmethod
    def scores(inputs: MiaInputs, options: Any) -> dict[str, np.ndarray]:
        return {"loss": loss_attack(inputs.losses)}
