"""The fedsim ServerApp: makes the strategy from a run's context and runs rounds.

``make_server_app(run, sinks)`` binds an app to a run's :class:`fedsim.context.RunContext`
(data, device, model factory) and its :class:`fedsim.sinks.RunSinks` (in-process and Ray
engines, which run the ServerApp in this process; :mod:`fedsim.runner` builds both). The
module-level ``app`` is the ServerApp of ``flwr run .``: its own process, so it is the
composition root there, kept minimal — it reads the scenario path and output folder from the
run config and builds the context and the scenario's sinks as the runner does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import fedsim.plugins  # noqa: F401  strategies and client hooks register (own process)
from fedsim.arrays import model_to_record
from fedsim.checkpoint import Checkpointer, resume_state
from fedsim.client.app import scenario_from_context
from fedsim.context import RunContext
from fedsim.engine.known_nodes import with_recorded_partitions
from fedsim.engine.ordered import ClientOrderedGrid
from fedsim.errors import RunStopped
from fedsim.lock import hold
from fedsim.privacy.audit_epsilon import accountant_claims
from fedsim.server.audits import make_audits
from fedsim.server.bn_statistics import BNStatistics
from fedsim.server.client_dp import summarize_client_dp
from fedsim.server.early_stop import EarlyStopper
from fedsim.server.evaluate import Evaluator
from fedsim.server.factory import make_strategy
from fedsim.server.loop import run_rounds
from fedsim.server.personalized import (
    PersonalizedEvaluator,
    personal_hooks,
    strategy_summaries,
)
from fedsim.sinks import RunFolder, RunSinks, check_packages, make_sinks
from fedsim.validate import check_bn_statistics, check_names


def server_main(grid: Grid, run: RunContext, sinks: RunSinks) -> None:
    """Train ``run``'s federation through ``grid``; rounds and the final model go to
    ``sinks`` (a run that stops on a failure leaves it in ``sinks.failure``)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    scenario, data, device = run.scenario, run.data, run.device
    model = run.new_model().to(device)
    arrays = model_to_record(model)
    strategy = make_strategy(scenario, model)
    evaluator = Evaluator(scenario.output, scenario.seed, data, model, device,
                          on_device=run.on_device,  # the run's device copies, shared
                          bn_eval=scenario.model.bn_eval)
    bn_statistics = BNStatistics(scenario.server.bn_statistics, model, data.example_inputs(2),
                                 scenario.model.bn_eval)
    grid = ClientOrderedGrid(grid, expected_nodes=scenario.num_participating)
    grid.get_node_ids()  # ask nodes for their client ids now, outside the seeded sampling
    evaluate = evaluator
    personal = None
    if hooks := personal_hooks(strategy):  # clients keep local arrays: evaluate their own models
        personal = PersonalizedEvaluator(
            hooks, grid, evaluator, data, model, device,
            cohort_size=scenario.engine.cohort_size if scenario.engine.vectorize else None,
            bn_eval=scenario.model.bn_eval)
        evaluate = lambda a: {**evaluator(a), **personal(a)}  # noqa: E731
    sinks.start(scenario)
    audit = make_audits(run, sinks.out, arrays, strategy)
    resumed = sinks.resume  # set by --resume
    checkpoint = Checkpointer(sinks.folder, scenario, strategy, grid, resumed, audit=audit)
    stopper = None
    if scenario.server.early_stop.enabled:  # a resumed run replays the rounds it kept
        stopper = EarlyStopper(scenario.server.early_stop).replay(sinks.rounds)
    stop = None
    try:
        if resumed is not None:
            arrays, start = resume_state(resumed, strategy, grid, audit)
        else:
            sinks.on_round({"round": 0, **evaluate(arrays)})  # the initial model
            if audit is not None:  # the audits see the initial model as round 0
                audit.on_replies(0, [], arrays)
            checkpoint(0, arrays)
            start = 1
        arrays = run_rounds(strategy, grid, arrays, scenario, evaluate, sinks.on_round,
                            start_round=start, checkpoint=checkpoint,
                            on_replies=audit.on_replies if audit else None,
                            bn_statistics=bn_statistics, early_stop=stopper)
    except RunStopped as exc:  # planned (DP budget, early stop) or a failure: results kept
        stop = exc
        arrays = getattr(exc, "arrays", arrays)
    finally:
        checkpoint.close()
    completed = stop is None or stop.planned  # a failure keeps what it got, nothing more
    notes = strategy_summaries(strategy) if completed else {}
    if bn_statistics.layers:  # the model has BN running statistics: say how they were made
        notes["bn_statistics"] = bn_statistics.summary(sinks.rounds)
    if personal is not None and completed:
        notes.update(personal.fedsim_summary())
    client_dp = summarize_client_dp(sinks.rounds, scenario)
    if client_dp is not None:  # [client.dp]: DP-SGD on the clients
        notes["client_dp"] = client_dp
    if audit is not None and completed:
        # after the strategy's notes: the audit reads the DP accountants (sample-level
        # DP-SGD's ε comes from the clients' replies)
        notes["privacy"] = audit.finish(arrays, accountants=accountant_claims(notes))
    for key, value in notes.items():
        sinks.note(key, value)
    sinks.finish(arrays, model, stop=stop)


def make_server_app(run: RunContext, sinks: RunSinks) -> ServerApp:
    """A ServerApp bound to ``run`` that reports to ``sinks``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(grid, run, sinks)

    return app


def _from_run_config(context: Context) -> tuple[RunContext, RunSinks]:
    scenario = scenario_from_context(context)
    check_names(scenario)  # the edge of `flwr run .`: registry names, before anything trains
    check_packages(scenario.output.sinks)
    out = Path(str(context.run_config.get("out", scenario.output.dir)))
    run = RunContext.build(scenario)
    check_bn_statistics(scenario, run.new_model(), run.data)  # needs the model
    folder = RunFolder(out, overwrite=bool(context.run_config.get("overwrite", True)))
    return run, RunSinks(folder, make_sinks(scenario))


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    run, sinks = _from_run_config(context)
    with hold(sinks.out, "the fedsim ServerApp of a deployed run"):  # one writer per folder
        sinks.folder.prepare()
        # the local Deployment Engine names its nodes' partitions: no query message per node
        grid = with_recorded_partitions(grid, context.run_config, run.data.participating)
        try:
            server_main(grid, run, sinks)
        except BaseException as exc:
            sinks.error(exc)
            raise
    if sinks.failure is not None:
        raise sinks.failure
