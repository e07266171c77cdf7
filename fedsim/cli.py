"""Command line: ``fedsim run | sweep | report | table | partitions``. Bad input exits 2
with one ``error:`` line; results that cannot be written (a full disk, a read-only, vanished
or forbidden folder) exit 3 and an engine that fails mid-run exits 4, each with one
``error:`` line saying what was kept and how to go on (README "Command line": every code)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedsim.config import limit_notes, load_scenario
from fedsim.errors import (
    EXIT_ENGINE_FAILED,
    EXIT_NOT_WRITTEN,
    EngineFailed,
    OneLineArgumentParser,
    ResultsNotWritten,
    ScenarioError,
)
from fedsim.interrupt import (
    Continuation,
    Interrupted,
    command,
    continuation,
    exit_code,
    failed_line,
    run_line,
    signals_interrupt,
)
from fedsim.run import resolve, resume, run
from fedsim.text import one_line

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
  fedsim table results/norm_sweep                      cells.csv: one row per cell and round
  fedsim partitions scenarios/quickstart.toml          per-client class counts

Bad input exits with code 2 and one "error:" line (also when another fedsim process is
writing the folder); results that cannot be written (full disk, read-only or missing
folder) exit 3, and an engine that fails mid-run (a Ray worker or Flower process lost)
exits 4, each with one "error:" line saying what was kept and how to resume; Ctrl-C exits
130 (SIGTERM 143) with the command that resumes the run. Run "fedsim COMMAND --help" for a
command's options."""


def _add_scenario_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("scenario", help="scenario TOML file", nargs="?" if optional else None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set model.norm=bn (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
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
    p_sweep.add_argument("--yes", action="store_true",
                         help="run a sweep of more than 1,000 cells (refused without it)")
    p_rep = sub.add_parser("report", help="rebuild a sweep's report.md, or compare finished "
                           "run folders in one report")
    p_rep.add_argument("folders", nargs="+", metavar="DIR",
                       help="one sweep folder, or run folders written by fedsim run")
    p_rep.add_argument("--out", help="where the comparison of run folders goes (a new or "
                       "empty folder, never one of the runs)")
    p_rep.add_argument("--overwrite", action="store_true",
                       help="replace what a non-empty --out folder holds")
    p_tab = sub.add_parser("table", help="rebuild a run's rounds table, or a sweep's cells "
                           "and claims tables, from its finished folders")
    p_tab.add_argument("folder", metavar="RUN_OR_SWEEP_DIR")
    p_tab.add_argument("--format", choices=("csv", "parquet"), default="csv",
                       help="csv (default) or parquet (needs fedsim[tables])")
    p_tab.add_argument("--out", metavar="FILE", help="the rounds (run) or cells (sweep) "
                       "table's path (default: in the folder); a sweep's claims table goes "
                       "beside it as <stem>_claims.<format>")
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
    warn = lambda msg: print(f"warning: {one_line(msg)}", file=sys.stderr)  # noqa: E731
    return resume(args.resume, warn=warn, progress=seen, show_progress=not args.quiet)


class RoundsSeen:
    """A progress callback that notes whether the run recorded a round (so an interrupted
    run knows it wrote to its folder)."""

    def __init__(self) -> None:
        self.any = False

    def __call__(self, record: dict) -> None:
        self.any = True


def _num(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def cmd_run(args: argparse.Namespace) -> int:
    seen = RoundsSeen()
    try:
        result = _run_or_resume(args, seen)
    except Interrupted as exc:
        return exit_code(exc, _run_interrupted(args, seen))
    except ResultsNotWritten as exc:
        return not_written(exc, _run_continuation(args, seen))
    _print_summary(result)
    return 0


def not_written(exc: ResultsNotWritten, then: Continuation | str) -> int:
    """Print the one line of a command whose results could not be written: what failed and
    why, what was kept, and the command that goes on (``then``: a run's continuation, or
    the rest of the line); the exit code."""
    if isinstance(then, Continuation):
        if then.command is None:
            then = then.kept
        elif then.how == "resume with":
            then = f"kept: {then.kept}; then {then.how}: {then.command}"
        else:
            kept = f"{then.kept}, nothing to resume" if then.kept else "nothing to resume"
            then = f"{kept}; then {then.how}: {then.command}"
    print(f"error: {one_line(exc)}; {one_line(then)}", file=sys.stderr, flush=True)
    return EXIT_NOT_WRITTEN


def _run_or_resume(args: argparse.Namespace, seen: RoundsSeen):
    if args.resume:
        return _resume(args, seen)
    if args.scenario is None:
        raise ScenarioError("fedsim run needs a scenario FILE (or --resume DIR)")
    scenario = resolve(args.scenario, args.overrides)
    if scenario.sweep.grid:
        print("note: fedsim run ignores the [sweep] grid and runs the base scenario; "
              "use `fedsim sweep` to run the grid", file=sys.stderr)
    if scenario.claims:
        from fedsim.report.claims import check_claim_metrics  # late: numpy, scipy (see imports)

        check_claim_metrics(scenario)  # an unknown metric is an error here too
        print(f"note: the {len(scenario.claims)} [[claims]] of this file are tested by "
              "`fedsim sweep` over its [sweep] grid; fedsim run trains the base scenario "
              "and tests none", file=sys.stderr)
    if scenario.server.dp.kind != "none":
        from fedsim.server.dp import start_lines  # late: Flower and torch (see imports)

        for line in start_lines(scenario):  # a calibrated σ; no ε for this strategy
            print(one_line(line), file=sys.stderr)
    return run(scenario, out=args.out, overwrite=args.overwrite, progress=seen,
               show_progress=not args.quiet)


def _run_interrupted(args: argparse.Namespace, seen: RoundsSeen) -> str:
    """The ``interrupted:`` line of ``fedsim run``, read from the run's folder."""
    where = _run_folder(args)
    if where is None:  # interrupted while the scenario was still being read
        return "interrupted before the run started"
    folder, scenario = where
    return run_line(folder, scenario.server.rounds, started=seen.any or bool(args.resume),
                    checkpoint_every=scenario.output.checkpoint_every,
                    restart=["fedsim", *args.argv])


def _run_continuation(args: argparse.Namespace, seen: RoundsSeen) -> Continuation:
    """What a ``fedsim run`` that could not write its results kept, and how it goes on."""
    if args.resume and not Path(args.resume).is_dir():  # removed while it resumed
        return Continuation(f"{args.resume} is gone", "start the run again with",
                            command(["fedsim", "run", "FILE", "--out", args.resume]))
    where = _run_folder(args)
    if where is None:
        return Continuation(None, "start it again with", command(["fedsim", *args.argv]))
    folder, scenario = where
    return continuation(folder, scenario.server.rounds, started=seen.any or bool(args.resume),
                        checkpoint_every=scenario.output.checkpoint_every,
                        restart=["fedsim", *args.argv])


def _run_folder(args: argparse.Namespace):
    """(results folder, scenario) of a ``fedsim run``, or None while they cannot be read."""
    try:
        if args.resume:
            folder = Path(args.resume)
            return folder, load_scenario(folder / "scenario.toml")
        scenario = resolve(args.scenario, args.overrides)
        return Path(args.out or scenario.output.dir), scenario
    except (ScenarioError, OSError):
        return None


def _print_summary(result) -> None:
    summary = result.summary
    final, timing = summary["final"], summary["timing"]
    clients = final.get("client_accuracy") or {}
    print(
        f"{one_line(summary['scenario'])}: global test accuracy "
        f"{_num(final['global_test_accuracy'])}, "
        f"client mean {_num(clients.get('mean'))} (p10 {_num(clients.get('p10'))}), "
        f"{_num(timing['client_updates_per_s'], '.1f')} client updates/s, "
        f"{_num(timing['seconds'], '.1f')} s → {one_line(result.path)}"
    )
    spent = (summary.get("dp") or {}).get("privacy_spent")
    if spent:
        eps = (f"ε = {spent['epsilon']:.3g} at δ = {spent['delta']:g}"
               if spent["epsilon"] is not None
               else "no ε (dp.privacy_spent.why_not says why)" if spent.get("why_not")
               else "no finite ε (no noise)")
        print(f"DP: {eps} after {spent['rounds']} noised rounds ({spent['sampling']} sampling, "
              f"rate {spent['sampling_rate']:.3g}, {spent['relation']}, σ = "
              f"{spent['noise_multiplier']:g}; covers the noised arrays only)")
    if stopped := (summary.get("dp") or {}).get("stopped"):
        print(f"DP: the run stopped cleanly: {stopped}")
    if (summary.get("stopped") or {}).get("kind") == "early_stop":
        print(f"stopped early: {one_line(summary['stopped']['reason'])}")


def cmd_sweep(args: argparse.Namespace) -> int:
    # late: torch and Flower (see imports)
    from fedsim.sweep import interrupted_line, not_written_tail, run_sweep

    if args.workers is not None and args.workers < 1:
        raise ScenarioError(f"--workers {args.workers} must be >= 1")
    say = None if args.quiet else (lambda msg: print(one_line(msg), file=sys.stderr,
                                                      flush=True))
    try:
        result = run_sweep(args.scenario, args.overrides, out=args.out, workers=args.workers,
                           overwrite=args.overwrite, progress=say, yes=args.yes)
    except Interrupted as exc:
        return exit_code(exc, interrupted_line(args.scenario, args.overrides, args.out,
                                               args.argv))
    except ResultsNotWritten as exc:
        return not_written(exc, not_written_tail(args.scenario, args.overrides, args.out,
                                                 args.argv))
    except EngineFailed as exc:  # a cell's engine: the sweep resumes it, not fedsim run
        tail = not_written_tail(args.scenario, args.overrides, args.out, args.argv)
        print(one_line(f"error: {exc}; {tail}"), file=sys.stderr, flush=True)
        return EXIT_ENGINE_FAILED
    print(f"{len(result.ran)} cells run, {len(result.skipped)} skipped "
          f"({result.seconds:.0f} s) → {one_line(result.report)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report.compare import report  # late: torch and Flower (see imports)

    warn = lambda msg: print(f"warning: {one_line(msg)}", file=sys.stderr)  # noqa: E731
    try:
        path = report(args.folders, out=args.out, overwrite=args.overwrite, warn=warn)
    except ResultsNotWritten as exc:  # the files written are whole; the runs are untouched
        again = ["fedsim", *args.argv]
        if args.out is not None and "--overwrite" not in again:
            again.append("--overwrite")
        return not_written(exc, f"the runs it reads are untouched; then run it again: "
                                f"{command(again)}")
    print(f"report → {one_line(path)}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from fedsim.report.compare import tables  # late: torch and Flower (see imports)

    for path in tables(args.folder, fmt=args.format, out=args.out,
                       note=lambda msg: print(f"note: {one_line(msg)}", file=sys.stderr)):
        print(f"table → {one_line(path)}")
    return 0


def cmd_partitions(args: argparse.Namespace) -> int:
    # late: torch (see the imports above)
    from fedsim.data import build_federated_data, describe_partition, plot_class_counts

    scenario = resolve(args.scenario, args.overrides)
    png = Path(args.png or f"{Path(args.scenario).stem}_partitions.png")
    if not png.suffix and not png.is_dir():
        png = png.with_suffix(".png")  # what matplotlib writes for a name without a suffix
    _check_figure_path(png)
    data = build_federated_data(scenario)
    report = describe_partition(data)  # every client, or a seeded sample of a large population
    try:
        plot_class_counts(data, png)
    except ResultsNotWritten as exc:
        return not_written(exc, "nothing was written; then run it again: "
                                + command(["fedsim", *args.argv]))
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


def _check_figure_path(path: Path) -> None:
    """A heat-map path matplotlib can write: not a folder, a format it knows."""
    if path.is_dir():
        raise ScenarioError(f"--png {str(path)!r} is a folder; give a file name, e.g. "
                            f"--png {path / 'partitions.png'}")
    from matplotlib.figure import Figure  # late: matplotlib (see imports)

    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix and suffix not in formats:
        raise ScenarioError(f"--png {str(path)!r}: matplotlib cannot write .{suffix} files; "
                            f"use one of .{', .'.join(sorted(formats))}")


def _sizes_line(sizes: dict) -> str:
    """One line of training-sample quantiles per client, naming what they are over."""
    q = sizes["train_samples"]
    if not q:
        return f"no clients ({sizes['over']})"
    return (f"train samples per client over {sizes['over']}: min {q['min']:g}, "
            f"p10 {q['p10']:g}, median {q['median']:g}, p90 {q['p90']:g}, max {q['max']:g}; "
            f"median classes present {sizes['classes_present']['median']:g}")


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "table": cmd_table,
            "partitions": cmd_partitions}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # an interrupted run prints the command that starts it again
    with signals_interrupt():  # Ctrl-C / SIGTERM: one line, exit 130 / 143 (fedsim.interrupt)
        try:
            for note in limit_notes():  # FEDSIM_MAX_ROUNDS / _CELLS shorten what runs
                print(note, file=sys.stderr)
            return COMMANDS[args.command](args)
        except ScenarioError as exc:  # one line, whatever the message holds (fedsim.text)
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        except ResultsNotWritten as exc:  # written outside a command's own handling
            return not_written(exc, "then run it again: " + command(["fedsim", *argv]))
        except EngineFailed as exc:  # a run's engine failed mid-run: checkpoints kept
            return failed_line(exc)
        except Interrupted as exc:  # report / partitions: nothing to resume
            return exit_code(exc, f"interrupted: fedsim {args.command} stopped")


if __name__ == "__main__":
    sys.exit(main())
