"""The small audited federation the privacy tests run, on CPU (tests/privacy) and on the GPU
(tests/gpu): a 6-client, 2-round scenario and every audit switched on."""

TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.2", "partition.test_fraction=0.5", "model.width=8",
        "client.epochs=1"]


def audit(*attacks: str) -> list[str]:
    """Overrides that switch every audit on, with membership-inference ``attacks``."""
    mia = ",".join(f'"{a}"' for a in attacks)
    return [f"privacy.mia=[{mia}]", "privacy.shadows=2", "privacy.fix_variance=true",
            "privacy.audit_every=1", "privacy.client_mia=true", "privacy.leakage=true",
            "privacy.inversion=true", "privacy.inversion_steps=20", "privacy.inversion_batch=2"]
