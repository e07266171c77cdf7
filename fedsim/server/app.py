"""The fedsim ServerApp: makes the strategy from a run's context and runs rounds.

``make_server_app(run, sink)`` binds an app to a run's :class:`fedsim.context.RunContext`
(data, device, model factory) and a result sink (in-process and Ray engines, which run the
ServerApp in this process); the module-level ``app`` reads the scenario path and output
folder from the run config (``flwr run .``) and builds the context there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from fedsim.errors import PrivacyBudgetSpent, RunStopped
from fedsim.lock import hold
from fedsim.privacy.audit_epsilon import accountant_claims
from fedsim.report.record import RunRecorder
from fedsim.server.audits import make_audits
from fedsim.server.bn_statistics import BNStatistics
from fedsim.server.client_dp import summarize_client_dp
from fedsim.server.evaluate import Evaluator
from fedsim.server.factory import make_strategy
from fedsim.server.loop import run_rounds
from fedsim.server.personalized import (
    PersonalizedEvaluator,
    personal_hooks,
    strategy_summaries,
)
from fedsim.validate import check_bn_statistics, check_names


def server_main(grid: Grid, run: RunContext, sink) -> None:
    """Train ``run``'s federation through ``grid``; rounds and the final model go to ``sink``."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    scenario, data, device = run.scenario, run.data, run.device
    model = run.new_model().to(device)
    arrays = model_to_record(model)
    strategy = make_strategy(scenario, model)
    evaluator = Evaluator(scenario.output, scenario.seed, data, model, device,
                          on_device=run.on_device,  # the run's device copies, shared
                          bn_eval=scenario.model.bn_eval)
    bn_statistics = BNStatistics(scenario.server.bn_statistics, model, data.input_shape,
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
    sink.start(scenario)
    audit = make_audits(run, sink.out, arrays, strategy)
    resumed = getattr(sink, "checkpoint", None)  # set by --resume
    checkpoint = Checkpointer(sink, scenario, strategy, grid, resumed, audit=audit)
    if resumed is not None:
        arrays, start = resume_state(resumed, strategy, grid, audit)
    else:
        sink.on_round({"round": 0, **evaluate(arrays)})
        if audit is not None:  # the audits see the initial model as round 0
            audit.on_replies(0, [], arrays)
        checkpoint(0, arrays)
        start = 1
    budget_spent = None
    try:
        arrays = run_rounds(strategy, grid, arrays, scenario, evaluate, sink.on_round,
                            start_round=start, checkpoint=checkpoint,
                            on_replies=audit.on_replies if audit else None,
                            bn_statistics=bn_statistics)
    except PrivacyBudgetSpent as exc:  # a planned end: finish as a complete run, say why
        budget_spent, arrays = exc, exc.arrays
    except RunStopped as exc:  # results so far are kept; the caller re-raises
        sink.stop(exc, exc.arrays, model)
        return
    finally:
        checkpoint.close()
    notes = strategy_summaries(strategy)
    if bn_statistics.layers:  # the model has BN running statistics: say how they were made
        notes["bn_statistics"] = bn_statistics.summary(getattr(sink, "rounds", []))
    if personal is not None:
        notes.update(personal.fedsim_summary())
    if audit is not None:  # after the strategy's notes: the audit reads the DP accountants
        dp_notes = dict(notes)  # sample-level DP-SGD's ε comes from the clients' replies
        client_dp = summarize_client_dp(getattr(sink, "rounds", []), scenario)
        if client_dp is not None:
            dp_notes["client_dp"] = client_dp
        notes["privacy"] = audit.finish(arrays, accountants=accountant_claims(dp_notes))
    for key, value in notes.items():
        sink.note(key, value)
    if budget_spent is not None:
        sink.stop(budget_spent, arrays, model, clean=True)
    else:
        sink.finish(arrays, model)


def make_server_app(run: RunContext, sink) -> ServerApp:
    """A ServerApp bound to ``run`` that reports to ``sink``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(grid, run, sink)

    return app


def _from_run_config(context: Context) -> tuple[RunContext, Callable]:
    scenario = scenario_from_context(context)
    check_names(scenario)  # the edge of `flwr run .`: registry names, before anything trains
    out = Path(str(context.run_config.get("out", scenario.output.dir)))
    run = RunContext.build(scenario)
    check_bn_statistics(scenario, run.new_model(), run.data.input_shape)  # needs the model
    return run, RunRecorder(out, overwrite=bool(context.run_config.get("overwrite", True)))


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    run, sink = _from_run_config(context)
    with hold(sink.out, "the fedsim ServerApp of a deployed run"):  # one writer per folder
        sink.prepare()
        # the local Deployment Engine names its nodes' partitions: no query message per node
        grid = with_recorded_partitions(grid, context.run_config, run.data.participating)
        server_main(grid, run, sink)
    if sink.stopped is not None:
        raise sink.stopped
