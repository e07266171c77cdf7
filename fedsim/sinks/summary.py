"""What a run's records add up to: ``summary.json`` and the scalars derived per round."""

from __future__ import annotations

import math
from collections import Counter

from fedsim.config import Scenario


def finite(obj):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def with_derived(record: dict) -> dict:
    """``record`` plus the scalars claims compare that a round's metrics imply:
    ``own_model_accuracy`` (each client's accuracy with the model it uses: its personalized
    one where it keeps local arrays, else the global one) and ``hybrid_alpha_mean``."""
    out = dict(record)
    own = record.get("personalized_accuracy") or record.get("client_accuracy")
    if own is not None:
        out["own_model_accuracy"] = own
    alphas = record.get("hybrid_alpha")
    if alphas:
        out["hybrid_alpha_mean"] = sum(alphas.values()) / len(alphas)
    return out


def summarize(rounds: list[dict], scenario: Scenario, seconds: float) -> dict:
    """``summary.json``: final metrics, generalization gaps and throughput (the sections a
    run's parts know better — DP, client DP, privacy, strategies — are notes the server adds,
    :meth:`fedsim.sinks.RunSinks.note`)."""
    evaluated = [r for r in rounds if "global_test_accuracy" in r]
    last = evaluated[-1] if evaluated else {}
    trained = [r for r in rounds if r.get("round", 0) >= 1]
    updates = sum(r.get("updates", 0) for r in trained)
    train_seconds = sum(r.get("train_seconds", 0.0) for r in trained)
    summary = {
        "scenario": scenario.name,
        "final": {
            "round": last.get("round"),
            "global_test_accuracy": last.get("global_test_accuracy"),
            "global_test_loss": last.get("global_test_loss"),
            "client_accuracy": last.get("client_accuracy"),
            "client_train_accuracy": last.get("client_train_accuracy"),
        },
        "generalization": last.get("generalization"),
        "timing": {
            "seconds": seconds,
            "train_seconds": train_seconds,
            "client_updates": updates,
            "client_updates_per_s": updates / train_seconds if train_seconds > 0 else None,
        },
        "failures": sum(len(r.get("failures", [])) for r in trained),
        "failure_reasons": dict(sorted(Counter(
            f.get("reason") for r in trained for f in r.get("failures", [])).items())),
        "engine": scenario.engine.kind,
        "communication": {  # train messages' arrays, in bytes (fedsim.client.compress)
            f"bytes_{way}": sum(r["communication"][way]["total"] for r in trained
                                if "communication" in r)
            for way in ("uploaded", "downloaded")},
    }
    if "hybrid_alpha" in last:
        summary["hybrid_alpha"] = last["hybrid_alpha"]
    for key in ("personalized_accuracy", "personalized_holdout_accuracy",
                "personalized_participation_gap"):
        if key in last:  # strategies whose clients keep local arrays (FedBN, SiloBN, ...)
            summary["final"][key] = last[key]
    for key in ("validation_accuracy", "validation_loss", "own_model_accuracy",
                "hybrid_alpha_mean", "hessian_max_eig", "sharpness",
                "global_test_perplexity", "client_perplexity"):
        if key in last:  # a validation split, derived (with_derived), hybrid norms,
            # output.sharpness, text
            summary["final"][key] = last[key]
    return summary
