"""The `hpsearch` command line: a table of subcommands whose help comes from their docstrings.

Heavy imports (torch, optuna) happen inside each command, so `hpsearch --help` is instant.
Exit codes: 0 success, 2 bad input (spec, arguments, unknown study), 1 a runtime failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

from search._command import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Command,
    _console,
    _positive_float,
    _positive_int,
    _storage_arg,
    _storage_hint,
)
from search._errors import SearchError, SpecError
from search._storage import redact


class Validate(Command):
    """Check a study file; touch nothing."""

    name = "validate"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", help="study file (YAML)")

    def run(self, args: argparse.Namespace) -> int:
        from search._space import auto_lr_key, distributions
        from search._spec import load_spec

        spec = load_spec(args.study)
        auto = auto_lr_key(spec)
        dists = [f"{key} (auto: LR range test at run)" if key == auto else name for key, name in
                 ((k, e.optuna_name(k)) for k, e in spec.space.items())]
        if auto is None:
            distributions(spec)  # every entry maps onto an Optuna distribution
        print(f"{args.study}: valid study {spec.name!r}: {len(dists)} searched parameters "
              f"({', '.join(dists)}), {spec.budget.trials} trials x {spec.budget.epochs} epochs, "
              f"sampler {spec.sampler.type}, pruner {spec.pruner.type}")
        return EXIT_OK


def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int,
                        help="CPU worker processes on this machine (they split the cores)")
    parser.add_argument("--gpus", default="auto",
                        help="auto (every visible GPU), none, or ids like 0,1: one worker "
                             "process per GPU slot, pinned with CUDA_VISIBLE_DEVICES")
    parser.add_argument("--trials-per-gpu", type=_positive_int, default=1,
                        help="worker processes per GPU (default 1)")
    parser.add_argument("--timeout", type=_positive_float,
                        help="stop starting trials after this many seconds")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    # Set by the supervisor on the processes it starts:
    parser.add_argument("--threads", type=_positive_int, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


class Run(Command):
    """Create or resume a study from its file and run trials until the budget is met."""

    name = "run"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", help="study file (YAML)")
        _storage_arg(parser)
        parser.add_argument("--trials", type=_positive_int,
                            help="global trial budget (COMPLETE+PRUNED), overriding the file")
        parser.add_argument("--create-only", action="store_true",
                            help="create (or check) the study and exit: workers join it later")
        parser.add_argument("--lr-find", action="store_true",
                            help="run the LR range test first and narrow space.lr to what it "
                                 "suggests (as space.lr: {auto: true} does); new studies only")
        parser.add_argument("--warm-start", metavar="STUDY[:k]",
                            help="enqueue the best k (default 5) completed trials of another "
                                 "study that fit this space, once")
        parser.add_argument("--warm-start-storage", metavar="URL",
                            help="storage of the --warm-start study (default: --storage)")
        _worker_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        slots = _plan(args)  # before torch is imported: a single GPU worker pins here
        from search._spec import load_spec

        spec = load_spec(args.study)  # a bad file fails here, before the storage is touched
        return _run_study(args, slots, spec=spec)


class Worker(Command):
    """Join an existing study by name from any machine, using the spec stored with it."""

    name = "worker"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", help="study name")
        _storage_arg(parser)
        _worker_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        args.trials = None
        return _run_study(args, _plan(args), name=args.name)


def _plan(args: argparse.Namespace) -> list[Any]:
    """The worker processes to run; with one, pin this process itself."""
    from search._supervisor import Slot, plan_slots

    if args.worker_index is not None:  # started by a supervisor: already pinned
        return [Slot(args.worker_index, args.device or "auto", "", args.threads or 1)]
    slots = plan_slots(args.gpus, trials_per_gpu=args.trials_per_gpu, workers=args.workers)
    if len(slots) == 1 and slots[0].device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = slots[0].cuda_visible_devices
    return slots


def _run_study(args: argparse.Namespace, slots: list[Any], *, spec: Any = None,
               name: str | None = None) -> int:
    from search._claim import budget_lock
    from search._progress import RunDisplay
    from search._storage import open_storage, resolve_url
    from search._study import budget_of, count_trials, load, reseed
    from search._supervisor import supervise
    from search._worker import WorkerError, quiet_optuna_warnings, run_worker

    quiet_optuna_warnings()
    url = resolve_url(args.storage)
    if spec is None:
        # A worker learns the heartbeat settings from the stored spec: open once to read it.
        _, spec = load(name, open_storage(url, must_exist=True))
    storage = open_storage(url, heartbeat_interval=spec.run.heartbeat_interval,
                           grace_period=spec.run.grace_period)
    if name is None:
        study, spec = _create(args, spec, storage)
    else:
        study, spec = load(name, storage)
    if getattr(args, "create_only", False):
        counts = count_trials(study)
        print(f"study {spec.name!r} ready in {redact(url)}: {counts.finished}/"
              f"{budget_of(study, spec)} trials finished; workers join with "
              f"`hpsearch worker {spec.name} --storage URL`")
        return EXIT_OK
    timeout = args.timeout or spec.budget.timeout_s
    # Each process its own seed: the supervisor's children by index, a joining worker by pid.
    reseed(study, spec, args.worker_index if args.worker_index is not None
           else (0 if name is None else None))
    if args.worker_index is not None:
        return _child_worker(study, spec, args, timeout, url)
    budget = budget_of(study, spec)
    counts = count_trials(study)
    console = _console()
    hint, dashboard = _storage_hint(args), redact(url)
    with RunDisplay(spec, budget, console=console) as display:
        display.start(counts, resumed=counts.finished + counts.failed > 0, study=study)
        if len(slots) > 1:
            code = supervise(study, spec, url, slots, display=display, timeout_s=timeout)
            display.finish(study, count_trials(study), hint, dashboard)
            return code
        device = args.device or ("cuda" if slots[0].device == "cuda" else None)
        try:
            summary = run_worker(
                study, spec, device=device, timeout_s=timeout, lock=budget_lock(url, spec.name),
                on_trial=lambda s, t: display.trial(s, t, count_trials(s)),
                on_epoch=display.epoch,
            )
        except WorkerError as e:
            console.print(f"[red]error:[/] {e}")
            display.finish(study, count_trials(study), hint, dashboard)
            return EXIT_FAILURE
    counts = count_trials(study)
    display.finish(study, counts, hint, dashboard)
    if summary.stopped == "timeout" and counts.finished < budget:
        console.print(f"stopped by the timeout ({timeout:g} s) with {counts.finished}/{budget} "
                      "trials finished; run the same command again to continue")
    return EXIT_OK


def _create(args: argparse.Namespace, spec: Any, storage: Any) -> tuple[Any, Any]:
    """`run`: the LR range test when asked for, the study, then any warm start."""
    from search._lr_find import needs_test
    from search._lr_find_cmd import for_new_study
    from search._space import auto_lr_key
    from search._study import create_or_load, load

    source = None
    if args.warm_start:  # a bad source is refused before anything is created
        from search._storage import open_storage, resolve_url
        from search._warm_start import load_source, parse_source

        name, k = parse_source(args.warm_start)
        label = None
        source_storage = storage
        if args.warm_start_storage:
            label = redact(resolve_url(args.warm_start_storage))
            source_storage = open_storage(args.warm_start_storage, must_exist=True)
        source = load_source(name, source_storage, target=spec.name, storage_label=label)
    elif args.warm_start_storage:
        raise SpecError("--warm-start-storage: goes with --warm-start STUDY[:k]")
    lr_find = None
    if needs_test(spec, force=args.lr_find):
        spec, lr_find = for_new_study(spec, storage, device=args.device)
    study = create_or_load(spec, storage, trials=args.trials, lr_find=lr_find)
    if auto_lr_key(spec) is not None:  # an existing study: its stored lr range is the one
        study, spec = load(spec.name, storage)
    if source is not None:
        from search._warm_start import warm_start

        print(warm_start(study, spec, source, k=k, storage_label=label).describe(), flush=True)
    return study, spec


def _child_worker(study: Any, spec: Any, args: argparse.Namespace, timeout: float | None,
                  url: str) -> int:
    """A worker process started by a supervisor: no display, SIGTERM ends it like Ctrl-C."""
    import signal

    from search._claim import budget_lock
    from search._worker import WorkerError, run_worker

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        run_worker(study, spec, device=args.device, threads=args.threads, timeout_s=timeout,
                   lock=budget_lock(url, spec.name))
    except WorkerError as e:
        print(f"worker {args.worker_index}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        # A gRPC proxy client left open races the interpreter's exit (epoll errors, a
        # non-zero code): close it while the process is still whole.
        close = getattr(getattr(study._storage, "_backend", study._storage), "close", None)
        if callable(close):
            close()
    return EXIT_OK


class Status(Command):
    """List studies, or show one: trials by state, best, running trials, failures."""

    name = "status"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", nargs="?", help="study name (omit to list studies)")
        _storage_arg(parser)
        parser.add_argument("--json", action="store_true", help="print the same as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from search._status import render_status, status_data, studies_overview
        from search._storage import open_storage
        from search._study import load
        from search._worker import quiet_optuna_warnings

        quiet_optuna_warnings()
        storage = open_storage(args.storage, must_exist=True)
        if args.name is None:
            rows = studies_overview(storage)
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no studies in this storage")
            else:
                for r in rows:
                    best = "" if r["best_value"] is None else f"  best {r['best_value']:.4g}"
                    print(f"{r['study']:<30} {r['trials']:>5} trials{best}")
            return EXIT_OK
        study, spec = load(args.name, storage)
        data = status_data(study, spec)
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            render_status(data, _console())
        return EXIT_OK


class Best(Command):
    """Print the best configuration, a file `python -m trainers` can train."""

    name = "best"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", help="study name")
        _storage_arg(parser)
        parser.add_argument("--format", choices=("yaml", "json"), default="yaml")

    def run(self, args: argparse.Namespace) -> int:
        import yaml

        from search._status import best_record
        from search._storage import open_storage
        from search._study import load
        from search._worker import quiet_optuna_warnings

        quiet_optuna_warnings()
        study, spec = load(args.name, open_storage(args.storage, must_exist=True))
        records = best_record(study, spec)
        if not records:
            print(f"error: study {args.name!r} has no completed trial yet", file=sys.stderr)
            return EXIT_FAILURE
        out: Any = records[0] if len(records) == 1 else {"pareto_front": records}
        if isinstance(out, dict) and "config" in out:
            out = {"study": args.name, **out}
        if args.format == "json":
            print(json.dumps(out, indent=2))
        else:
            print(f"# best of study {args.name}; train it with: python -m trainers FILE.yaml")
            print(yaml.safe_dump(out, sort_keys=False), end="")
        return EXIT_OK


class StorageProxy(Command):
    """Serve Optuna's gRPC storage proxy in front of the database, for very many workers."""

    name = "storage-proxy"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _storage_arg(parser)
        parser.add_argument("--host", default="127.0.0.1",
                            help="address to bind (default 127.0.0.1; 0.0.0.0 for other hosts)")
        parser.add_argument("--port", type=_positive_int, default=13000)

    def run(self, args: argparse.Namespace) -> int:
        import warnings

        import optuna
        from optuna.storages import run_grpc_proxy_server

        from search._storage import open_storage, resolve_url

        url = resolve_url(args.storage)
        if url.startswith("grpc://"):
            raise SpecError("--storage: the proxy serves a database URL, not another proxy")
        storage = optuna.storages.get_storage(open_storage(url))  # cached, as Optuna advises
        print(f"storage proxy for {redact(url)} on grpc://{args.host}:{args.port}; workers use "
              f"--storage grpc://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            run_grpc_proxy_server(storage, host=args.host, port=args.port)
        return EXIT_OK


def _commands() -> list[Command]:
    from search._dashboard import Dashboard
    from search._lr_find_cmd import LrFind
    from search._report import Report
    from search._retrain import Retrain

    return [Validate(), Run(), Worker(), Status(), Best(), Dashboard(), LrFind(), Retrain(),
            Report(), StorageProxy()]


COMMANDS: list[Command] = _commands()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpsearch",
        description="Automated hyperparameter search for PyTorch models, built on Optuna.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        doc = (command.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(command.name, help=doc, description=doc)
        command.add_arguments(p)
        p.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad arguments, as DESIGN.md asks
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    debug = args.debug or bool(os.environ.get("HPSEARCH_DEBUG"))
    try:
        return args.handler.run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SpecError as e:
        return _fail(str(e), EXIT_BAD_INPUT, debug)
    except SearchError as e:
        return _fail(str(e), EXIT_FAILURE, debug)
    except Exception as e:  # the CLI's last line of defence: one clear line, no traceback
        from trainers import ConfigError, TrainerError

        code = EXIT_BAD_INPUT if isinstance(e, ConfigError) else EXIT_FAILURE
        message = str(e) if isinstance(e, TrainerError) else f"{type(e).__name__}: {e}"
        return _fail(message, code, debug)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    hint = "" if debug else " (--debug shows the traceback)" if code == EXIT_FAILURE else ""
    print(f"error: {redact(message)}{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
