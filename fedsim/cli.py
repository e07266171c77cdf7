"""Command line: ``fedsim run | sweep | report | partitions``. Bad input exits 2 with one
``error:`` line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.interrupt import Interrupted, exit_code, run_line, signals_interrupt
from fedsim.report.progress import round_progress
from fedsim.run import resolve, resume, run

# The commands' heavy modules (torch, Flower, the registries: seconds to import) are imported
# inside the command that needs them, so `fedsim --help` and bad arguments answer at once.

DESCRIPTION = """\
fedsim: a federated-learning simulator on Flower and PyTorch. A scenario is one TOML
file; the normalization layer (bn, in, gn, ln, rms, none, hybrid) is one switch."""

EPILOG = """\
examples:
  fedsim run scenarios/quickstart.toml                 train, write results/quickstart/
  fedsim run scenarios/quickstart.toml --set model.norm=bn --out results/bn
  fedsim run --resume results/bn                       finish an interrupted run
  fedsim sweep scenarios/norm_sweep.toml               every cell of a [sweep], report.md
  fedsim report results/a results/b                    compare finished runs
  fedsim partitions scenarios/quickstart.toml          per-client class counts

Bad input exits with code 2 and one "error:" line; Ctrl-C exits 130 (SIGTERM 143) with
the command that resumes the run. Run "fedsim COMMAND --help" for a command's options."""


def _add_scenario_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("scenario", help="scenario TOML file", nargs="?" if optional else None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set model.norm=bn (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one federation and write a results folder")
    _add_scenario_args(p_run, optional=True)
    p_run.add_argument("--resume", metavar="DIR",
                       help="continue the interrupted run in results folder DIR from its last "
                            "checkpoint (its own scenario.toml; no FILE, --set, --out)")
    p_run.add_argument("--out", help="results folder (default: output.dir of the scenario)")
    p_run.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty results folder")
    p_run.add_argument("--quiet", action="store_true", help="no progress display")
    p_sweep = sub.add_parser("sweep", help="run every cell of the scenario's [sweep] grid "
                             "(resumable) and write report.md")
    _add_scenario_args(p_sweep)
    p_sweep.add_argument("--out", help="sweep folder (default: output.dir of the scenario)")
    p_sweep.add_argument("--workers", type=int, help="cells run in parallel (default: "
                         "sweep.workers)")
    p_sweep.add_argument("--overwrite", action="store_true",
                         help="delete the sweep folder and run every cell again")
    p_sweep.add_argument("--quiet", action="store_true", help="no progress lines")
    p_rep = sub.add_parser("report", help="rebuild a sweep's report.md, or compare finished "
                           "run folders in one report")
    p_rep.add_argument("folders", nargs="+", metavar="DIR",
                       help="one sweep folder, or run folders written by fedsim run")
    p_rep.add_argument("--out", help="where the comparison of run folders goes")
    p_part = sub.add_parser("partitions", help="show per-client class counts (text: each "
                            "client's speaking role) and a heat map (of a seeded sample of "
                            "clients when there are many)")
    _add_scenario_args(p_part)
    p_part.add_argument("--json", action="store_true",
                        help="print JSON instead of a table: a list of per-client rows, or, for "
                        "a population too large to list, an object whose rows are a seeded "
                        "sample of clients (keys population, sampled, note, sizes, rows)")
    p_part.add_argument("--png", help="heat-map path (default: <scenario stem>_partitions.png)")
    return parser


def _resume(args: argparse.Namespace, seen: RoundsSeen):
    """``fedsim run --resume DIR``: the folder's own scenario, nothing else may change it."""
    extra = [name for name, given in (("FILE", args.scenario), ("--set", args.overrides),
                                      ("--out", args.out), ("--overwrite", args.overwrite))
             if given]
    if extra:
        raise ScenarioError(
            f"--resume DIR continues the run exactly as DIR/scenario.toml describes; it takes "
            f"no {', '.join(extra)} (start a new run with FILE --out NEW_DIR instead)")
    warn = lambda msg: print(f"warning: {msg}", file=sys.stderr)  # noqa: E731
    toml = Path(args.resume) / "scenario.toml"
    if args.quiet or not toml.is_file():
        return resume(args.resume, warn=warn, progress=seen)
    scenario = load_scenario(toml)
    with round_progress(scenario.server.rounds, f"{scenario.name} (resumed)",
                        scenario.partition.num_clients) as on_round:
        return resume(args.resume, progress=seen.then(on_round), warn=warn)


class RoundsSeen:
    """A progress callback that notes whether the run recorded a round (so an interrupted
    run knows it wrote to its folder), passing each record on to ``then``'s callback."""

    def __init__(self) -> None:
        self.any = False
        self._next = None

    def then(self, on_round) -> RoundsSeen:
        self._next = on_round
        return self

    def __call__(self, record: dict) -> None:
        self.any = True
        if self._next is not None:
            self._next(record)


def _num(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def cmd_run(args: argparse.Namespace) -> int:
    seen = RoundsSeen()
    try:
        result = _run_or_resume(args, seen)
    except Interrupted as exc:
        return exit_code(exc, _run_interrupted(args, seen))
    _print_summary(result)
    return 0


def _run_or_resume(args: argparse.Namespace, seen: RoundsSeen):
    if args.resume:
        return _resume(args, seen)
    if args.scenario is None:
        raise ScenarioError("fedsim run needs a scenario FILE (or --resume DIR)")
    scenario = resolve(args.scenario, args.overrides)
    if scenario.sweep.grid:
        print("note: fedsim run ignores the [sweep] grid and runs the base scenario; "
              "use `fedsim sweep` to run the grid", file=sys.stderr)
    if scenario.server.dp.kind != "none":
        from fedsim.server.dp import start_lines  # late: Flower and torch (see imports)

        for line in start_lines(scenario):  # a calibrated σ; no ε for this strategy
            print(line, file=sys.stderr)
    if args.quiet:
        return run(scenario, out=args.out, overwrite=args.overwrite, progress=seen)
    with round_progress(scenario.server.rounds, scenario.name,
                        scenario.partition.num_clients) as on_round:
        return run(scenario, out=args.out, overwrite=args.overwrite,
                   progress=seen.then(on_round))


def _run_interrupted(args: argparse.Namespace, seen: RoundsSeen) -> str:
    """The ``interrupted:`` line of ``fedsim run``, read from the run's folder."""
    try:
        if args.resume:
            folder = Path(args.resume)
            scenario = load_scenario(folder / "scenario.toml")
        else:
            scenario = resolve(args.scenario, args.overrides)
            folder = Path(args.out or scenario.output.dir)
    except (ScenarioError, OSError):  # interrupted while the scenario was still being read
        return "interrupted before the run started"
    return run_line(folder, scenario.server.rounds, started=seen.any or bool(args.resume),
                    checkpoint_every=scenario.output.checkpoint_every,
                    restart=["fedsim", *args.argv])


def _print_summary(result) -> None:
    summary = result.summary
    final, timing = summary["final"], summary["timing"]
    clients = final.get("client_accuracy") or {}
    print(
        f"{summary['scenario']}: global test accuracy {_num(final['global_test_accuracy'])}, "
        f"client mean {_num(clients.get('mean'))} (p10 {_num(clients.get('p10'))}), "
        f"{_num(timing['client_updates_per_s'], '.1f')} client updates/s, "
        f"{_num(timing['seconds'], '.1f')} s → {result.path}"
    )
    spent = (summary.get("dp") or {}).get("privacy_spent")
    if spent:
        eps = (f"ε = {spent['epsilon']:.3g} at δ = {spent['delta']:g}"
               if spent["epsilon"] is not None
               else "no ε (the DP-FedAvg analysis does not hold)" if spent.get("why_not")
               else "no finite ε (no noise)")
        print(f"DP: {eps} after {spent['rounds']} noised rounds (sampling rate "
              f"{spent['sampling_rate']:.3g}, σ = {spent['noise_multiplier']:g}; covers the "
              "noised arrays only)")
    if stopped := (summary.get("dp") or {}).get("stopped"):
        print(f"DP: the run stopped cleanly: {stopped}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep import interrupted_line, run_sweep  # late: torch and Flower (see imports)

    if args.workers is not None and args.workers < 1:
        raise ScenarioError(f"--workers {args.workers} must be >= 1")
    say = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = run_sweep(args.scenario, args.overrides, out=args.out, workers=args.workers,
                           overwrite=args.overwrite, progress=say)
    except Interrupted as exc:
        return exit_code(exc, interrupted_line(args.scenario, args.overrides, args.out,
                                               args.argv))
    print(f"{len(result.ran)} cells run, {len(result.skipped)} skipped "
          f"({result.seconds:.0f} s) → {result.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report.compare import report  # late: torch and Flower (see imports)

    print(f"report → {report(args.folders, out=args.out)}")
    return 0


def cmd_partitions(args: argparse.Namespace) -> int:
    # late: torch (see the imports above)
    from fedsim.data import build_federated_data, describe_partition, plot_class_counts

    scenario = resolve(args.scenario, args.overrides)
    data = build_federated_data(scenario)
    report = describe_partition(data)  # every client, or a seeded sample of a large population
    png = Path(args.png or f"{Path(args.scenario).stem}_partitions.png")
    plot_class_counts(data, png)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        if report.sampled:
            print(f"{report.scope}:")
        roles = bool(report.rows) and "role" in report.rows[0]
        last = "speeches characters  role (play/SPEAKER)" if roles else "train counts per class"
        print(f"{'client':>6} {'holdout':>7} {'train':>6} {'test':>5}  {last}")
        for row in report.rows:
            tail = (f"{row['speeches']:>8} {row['characters']:>10}  {row['role']}" if roles
                    else str(row["train_counts"]))
            print(f"{row['client']:>6} {str(row['holdout']):>7} {sum(row['train_counts']):>6} "
                  f"{sum(row['test_counts']):>5}  {tail}")
        print(_sizes_line(report.sizes()))
    print(f"heat map → {png}", file=sys.stderr)
    return 0


def _sizes_line(sizes: dict) -> str:
    """One line of training-sample quantiles per client, naming what they are over."""
    q = sizes["train_samples"]
    if not q:
        return f"no clients ({sizes['over']})"
    return (f"train samples per client over {sizes['over']}: min {q['min']:g}, "
            f"p10 {q['p10']:g}, median {q['median']:g}, p90 {q['p90']:g}, max {q['max']:g}; "
            f"median classes present {sizes['classes_present']['median']:g}")


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report,
            "partitions": cmd_partitions}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # an interrupted run prints the command that starts it again
    with signals_interrupt():  # Ctrl-C / SIGTERM: one line, exit 130 / 143 (fedsim.interrupt)
        try:
            return COMMANDS[args.command](args)
        except ScenarioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Interrupted as exc:  # report / partitions: nothing to resume
            return exit_code(exc, f"interrupted: fedsim {args.command} stopped")


if __name__ == "__main__":
    sys.exit(main())
