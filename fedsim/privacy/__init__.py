"""Privacy attacks and leakage measures, as pure functions on torch models and numpy arrays.

- :mod:`~fedsim.privacy.metrics`: AUC, balanced accuracy, TPR at low FPR, log-log ROC plots.
- :mod:`~fedsim.privacy.mia`: what membership attacks read (per-example outputs, shadow
  splits); :mod:`~fedsim.privacy.attacks`: the attacks (loss threshold, LiRA, RMIA), one
  module each, registered.
- :mod:`~fedsim.privacy.audits`: the audits of a run, one module each, registered.
- :mod:`~fedsim.privacy.audit_epsilon`: the ε an attack's ROC would certify on independent
  trials (Clopper–Pearson, Bonferroni).
- :mod:`~fedsim.privacy.one_run`: an ε lower bound from canaries in one run (Steinke et al.).
- :mod:`~fedsim.privacy.canary`: an ε estimate from canary clients (Andrew et al.).
- :mod:`~fedsim.privacy.inversion`: gradient inversion of a client update (iDLG labels,
  Inverting Gradients), PSNR / SSIM.
- :mod:`~fedsim.privacy.leakage`: which uploaded arrays carry data statistics (BN buffers),
  and recovering those statistics.
- :mod:`~fedsim.privacy.exposure`: canary exposure of planted secrets in text (The Secret
  Sharer), exact over every candidate or estimated from a sample.
"""

from fedsim.privacy.attacks.lira import lira_scores
from fedsim.privacy.attacks.loss import loss_attack
from fedsim.privacy.attacks.rmia import rmia_scores
from fedsim.privacy.audit_epsilon import empirical_epsilon
from fedsim.privacy.canary import epsilon_of_gaussians, gaussian_estimate
from fedsim.privacy.inversion import (
    InversionResult,
    client_gradient,
    image_metrics,
    invert_gradients,
    invert_update,
    match_reconstructions,
    psnr,
    recover_labels,
    save_image_grid,
    simulate_update,
    ssim,
    total_variation,
)
from fedsim.privacy.leakage import (
    LeakedStats,
    has_running_stats,
    input_stats_from_bn,
    recover_batch_stats,
    uploaded_arrays,
)
from fedsim.privacy.metrics import attack_metrics, plot_roc, roc_points, tpr_at_fpr
from fedsim.privacy.mia import per_example_outputs, shadow_split
from fedsim.privacy.one_run import one_run_audit

__all__ = [
    "InversionResult",
    "LeakedStats",
    "attack_metrics",
    "client_gradient",
    "empirical_epsilon",
    "epsilon_of_gaussians",
    "gaussian_estimate",
    "has_running_stats",
    "image_metrics",
    "input_stats_from_bn",
    "invert_gradients",
    "invert_update",
    "lira_scores",
    "loss_attack",
    "match_reconstructions",
    "one_run_audit",
    "per_example_outputs",
    "plot_roc",
    "psnr",
    "recover_batch_stats",
    "recover_labels",
    "rmia_scores",
    "roc_points",
    "save_image_grid",
    "shadow_split",
    "simulate_update",
    "ssim",
    "total_variation",
    "tpr_at_fpr",
    "uploaded_arrays",
]
