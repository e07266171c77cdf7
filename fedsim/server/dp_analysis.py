"""Which strategies the DP-FedAvg ε holds for, keyed by strategy class.

Flower's DP wrappers add noise σ·C/m to the wrapped strategy's *output*. The DP-FedAvg
analysis (McMahan et al., ICLR 2018: sensitivity C/m of the clipped mean, each round a
subsampled Gaussian mechanism) holds only where that output is the uniformly weighted mean of
the m clipped updates, and where no client's data reaches other clients' later updates except
through the noised model. Each class is entered here with ``None`` (the analysis holds) or the
reason it does not; fedsim's own strategies enter themselves with :func:`dp_fedavg`.

A class holds only if it is itself entered: a subclass of a checked class may change
``aggregate_train``, so it is unknown. A subclass of a class the analysis does *not* hold for
inherits the reason (it keeps the server step that breaks it, unless it says otherwise).

One rule covers what leaves a client without noise, whatever the strategy: an array a client
uploads that the DP wrapper does not clip and noise — BatchNorm (or HybridNorm) running
statistics and their counters, a hook's extras such as SCAFFOLD's Δc — is a data-dependent
release outside the Gaussian mechanism, so no client-level ε holds for what a client sends
(:func:`unnoised_why`). Arrays a strategy keeps on the clients (FedBN's norm layers,
SiloBN's statistics) are never sent, so they do not count. The run decides from what clients
actually upload; :func:`predicted_unnoised` says so before a run, from ``model.norm`` and the
strategy (``dp_fedavg(statistics_local=True)``: its clients keep running statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.serverapp import strategy as flwr

#: class -> None (the DP-FedAvg ε holds) or why it does not
TABLE: dict[type, str | None] = {}
#: strategy classes whose clients never upload normalization statistics
STATISTICS_LOCAL: set[type] = set()

ADAPTIVE = ("its adaptive server optimizer divides the update by a running second-moment "
            "estimate, which rescales one client's influence beyond the C/m the noise is "
            "calibrated to")
MOMENTUM = ("its server momentum carries each round's noised update into every later round, "
            "so a client's influence is not one Gaussian release per round")
ROBUST = ("a robust aggregate (median, trimmed mean, Krum selection) is not the clipped mean: "
          "its sensitivity to one client is not C/m")

TABLE.update({
    flwr.FedAvg: None,  # with uniform weights, which fedsim's DP wrapper sets
    flwr.FedProx: None,  # FedAvg on the server; the proximal term is client-side
    flwr.FedAdam: ADAPTIVE,
    flwr.FedYogi: ADAPTIVE,
    flwr.FedAdagrad: ADAPTIVE,
    flwr.FedAvgM: MOMENTUM,
    flwr.FedMedian: ROBUST,
    flwr.FedTrimmedAvg: ROBUST,
    flwr.Krum: ROBUST,
    flwr.MultiKrum: ROBUST,
    flwr.Bulyan: ROBUST,
    flwr.QFedAvg: "q-FFL reweights clients by their loss, so the output is not the uniform "
                  "mean of the clipped updates",
})


def dp_fedavg(why_not: str | None = None, statistics_local: bool = False
              ) -> Callable[[type], type]:
    """Class decorator: enter a strategy in :data:`TABLE` (``why_not=None``: the ε holds);
    ``statistics_local``: its clients keep normalization statistics and never upload them."""

    def enter(cls: type) -> type:
        TABLE[cls] = why_not
        if statistics_local:
            STATISTICS_LOCAL.add(cls)
        return cls

    return enter


def why_not(cls: type) -> str | None:
    """Why the DP-FedAvg ε does not hold for strategy class ``cls`` (None: it holds)."""
    if cls in TABLE:
        reason = TABLE[cls]
        return None if reason is None else f"{cls.__name__}: {reason}"
    for base in cls.__mro__[1:]:
        if TABLE.get(base) is not None:
            return f"{cls.__name__} is a {base.__name__}: {TABLE[base]}"
    return (f"{cls.__module__}.{cls.__qualname__} is a strategy fedsim has not checked: its "
            "output need not be the uniformly weighted mean of the clipped updates that the "
            "DP-FedAvg analysis (sensitivity C/m) assumes")


UNNOISED = ("clients upload {arrays} without clipping or noise: data-dependent values (running "
            "statistics of normalization layers, a hook's extras) leave every sampled client "
            "outside the Gaussian mechanism, so no client-level guarantee covers what a client "
            "sends; use a norm without running statistics (gn, ln, in, none) or a strategy that "
            "keeps them on the clients (fedbn, silobn)")


def unnoised_why(excluded: Iterable[str]) -> str | None:
    """Why no ε holds when clients uploaded these arrays un-noised (None: there were none)."""
    names = sorted(excluded)
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return UNNOISED.format(arrays=f"{len(names)} array(s) ({shown})")


def predicted_unnoised(cls: type, norm_has_statistics: bool) -> str | None:
    """Before a run: why no ε will hold because running statistics will be uploaded un-noised
    (``model.norm`` keeps them and the strategy does not keep them local), else None."""
    if not norm_has_statistics or any(c in STATISTICS_LOCAL for c in cls.__mro__):
        return None
    return UNNOISED.format(arrays="the model's normalization running statistics")
