"""The small audited federation the privacy tests run, on CPU (tests/privacy) and on the GPU
(tests/gpu): a 6-client, 2-round scenario and every audit switched on."""

TINY = ["server.rounds=2", "partition.num_clients=6", "server.clients_per_round=3",
        "partition.holdout_clients=0.2", "partition.test_fraction=0.5", "model.width=8",
        "client.epochs=1"]


def audits(*names: str) -> str:
    """The override that runs the audits ``names``: ``privacy.audits=["mia", ...]``."""
    return "privacy.audits=[" + ",".join(f'"{n}"' for n in names) + "]"


def audit(*attacks: str) -> list[str]:
    """Overrides that switch the membership, per-upload, leakage and inversion audits on,
    with membership-inference ``attacks``."""
    mia = ",".join(f'"{a}"' for a in attacks)
    return [audits("mia", "client_mia", "leakage", "inversion"), f"privacy.mia.attacks=[{mia}]",
            "privacy.mia.shadows=2", "privacy.mia.lira.fix_variance=true", "privacy.mia.every=1",
            "privacy.inversion.steps=20", "privacy.inversion.batch=2"]
