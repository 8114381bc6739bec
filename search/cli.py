"""The `hpsearch` command line: a table of subcommands whose help comes from their docstrings.

Each command parses its arguments and calls into the packages: `spec` (the study file), `run`
(studies and workers), `views` (what is shown) and `storage`. They load on first use, so
`hpsearch --help` is instant. Exit codes: 0 success, 2 bad input (spec, arguments, unknown
study), 1 a runtime failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import os
import sys
import traceback
from contextlib import AbstractContextManager, nullcontext
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

from search._auth import CA_ENV, TOKEN_ENV
from search._errors import SearchError, SpecError
from search._log import for_cli
from search._urls import DEFAULT_URL, ENV_VAR, redact, resolve_url

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _package(name: str) -> ModuleType:
    """A package of search/, imported when a command first needs it (torch and Optuna load
    with it). Optuna's INFO lines and experimental warnings are hidden once it loads: the
    command's own output says it better (a program's: `search.tune` leaves Optuna alone)."""
    package = import_module(f"search.{name}")
    import_module("search.storage").quiet_optuna_warnings()
    return package


def _storage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=None,
        help=f"study storage URL (default: ${ENV_VAR}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--tls-ca", default=None, metavar="CA.pem",
        help=f"the private CA a grpcs:// storage proxy's certificate is checked against "
             f"(default: ${CA_ENV}, else the system's); the token comes from ${TOKEN_ENV}",
    )


def _study_arg(parser: argparse.ArgumentParser) -> None:
    """A command on one stored study: its name and storage."""
    parser.add_argument("name", help="study name")
    _storage_arg(parser)


def _server_args(parser: argparse.ArgumentParser, *, port: int, other_hosts: str) -> None:
    """A command that serves the storage: where it listens, with which TLS files and token."""
    _storage_arg(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help=f"address to bind (default 127.0.0.1; {other_hosts}: then TLS "
                             "and a token are required)")
    parser.add_argument("--port", type=_positive_int, default=port)
    parser.add_argument("--tls-cert", metavar="CERT.pem", help="serve TLS with this "
                        "certificate (PEM; a chain: the server's first)")
    parser.add_argument("--tls-key", metavar="KEY.pem", help="the certificate's private key")
    parser.add_argument("--token-file", metavar="FILE", help=f"the token every caller must "
                        f"present (default: ${TOKEN_ENV})")
    parser.add_argument("--insecure", action="store_true", help="serve beyond this machine "
                        "without TLS or a token (a warning on every start)")


def _serving(args: argparse.Namespace, what: str) -> Any:
    from search._auth import serving

    return serving(args.host, tls_cert=args.tls_cert, tls_key=args.tls_key,
                   token_file=args.token_file, insecure=args.insecure, what=what)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _per_gpu(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}"
                                         ) from None


def _pack(text: str) -> int | str:
    limit = _package("spec").PACK_MAX
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"expected auto or an integer from 1 to {limit}, "
                                         f"got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class Command:
    """Base of a subcommand: the docstring's first line is its help."""

    name = ""
    # A command that only reads the storage is run again when the storage's connection is
    # lost (a database restart): what it prints comes from the second, whole, attempt.
    reads_only = False
    # A command that reads a study's stored spec and trains nothing: the spec was checked when
    # the study was created, so its trainer names are not checked again (`trainers.
    # names_trusted`), and torch never loads.
    stored_spec_only = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class Validate(Command):
    """Check a study file; touch nothing."""

    name = "validate"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", help="study file (YAML)")

    def run(self, args: argparse.Namespace) -> int:
        spec = _package("spec")
        loaded = spec.load_spec(args.study)
        # A setting that depends on this machine's environment: refused here, not at `run`.
        _package("storage").checkpoint_location(loaded.run.checkpoint_dir, None)
        print(f"{args.study}: {spec.describe(loaded)}")
        for outlook in (spec.sampler_outlook(loaded), spec.pack_outlook(loaded)):
            if outlook is not None:
                print(f"{args.study}: {outlook}")
        return EXIT_OK


def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int,
                        help="CPU worker processes on this machine (they split the cores)")
    parser.add_argument("--gpus", default="auto",
                        help="auto (every visible GPU), none, or ids like 0,1: one worker "
                             "process per GPU slot, pinned with CUDA_VISIBLE_DEVICES")
    parser.add_argument("--trials-per-gpu", type=_per_gpu, default="auto",
                        help="worker processes per GPU, or auto (the default): one, then more "
                             "while their memory fits and the GPU is not busy; an out-of-"
                             "memory on a shared GPU queues the trial again and lowers it")
    parser.add_argument("--timeout", type=_positive_float,
                        help="stop starting trials after this many seconds")
    parser.add_argument("--pack", type=_pack, metavar="K|auto",
                        help="train up to K trials at once in each worker as one batched model "
                             "(small MLPs; others run one at a time); auto: 8 on a CPU, 32 "
                             "on a GPU for models under 1M parameters, larger ones one at a "
                             "time, grown on a GPU while it fits; "
                             "overrides run.pack")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run the workers as Ray actors on a Ray cluster: auto, "
                             "ray://host:10001, host:6379, or none given (a local Ray started "
                             "here); one per free GPU slot or CPU share, --workers K at most")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    # Set by the supervisor on the processes it starts:
    parser.add_argument("--threads", type=_positive_int, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    # Set by `hpsearch slurm` on its tasks: a study stopped by `hpsearch stop` stays stopped.
    parser.add_argument("--unless-stopped", action="store_true", help=argparse.SUPPRESS)


def _launch(args: argparse.Namespace, **extra: Any) -> tuple[Any, list[Any]]:
    """What `run`/`worker` was asked for, and the worker slots (a single GPU worker is pinned
    here, before torch loads)."""
    run, workers = _package("run"), _package("workers")
    if args.ray is not None and args.worker_index is None:  # Ray places them: no local slots
        per_gpu = 1 if args.trials_per_gpu == "auto" else args.trials_per_gpu
        request = workers.ray_request(args.ray, gpus=args.gpus, trials_per_gpu=per_gpu,
                                  workers=args.workers, storage=args.storage)
        return run.Launch(storage=args.storage, timeout_s=args.timeout, ray=request,
                          pack=args.pack, **extra), []
    slots = workers.plan(args.gpus, trials_per_gpu=args.trials_per_gpu, workers=args.workers,
                     worker_index=args.worker_index, device=args.device, threads=args.threads)
    fill = args.trials_per_gpu == "auto" and any(s.device == "cuda" for s in slots)
    launch = run.Launch(storage=args.storage, timeout_s=args.timeout, device=args.device,
                        threads=args.threads, worker_index=args.worker_index, fill_gpus=fill,
                        unless_stopped=args.unless_stopped, pack=args.pack,
                        trials_per_gpu=args.trials_per_gpu, **extra)
    return launch, slots


def _display() -> Any:
    views = _package("views")
    console = views.make_console()
    return lambda spec, budget: views.RunDisplay(spec, budget, console=console)


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
        launch, slots = _launch(args, trials=args.trials, create_only=args.create_only,
                                lr_find=args.lr_find, warm_start=args.warm_start,
                                warm_start_storage=args.warm_start_storage)
        # A bad file fails here, before the storage is touched.
        spec = _package("spec").load_spec(args.study)
        return _package("run").run_study(launch, slots, spec=spec, display=_display())


class Worker(Command):
    """Join an existing study by name from any machine, using the spec stored with it."""

    name = "worker"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        _worker_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        launch, slots = _launch(args)
        display = None if args.worker_index is not None else _display()
        return _package("run").run_study(launch, slots, name=args.name, display=display)


class Status(Command):
    """List studies, or show one: trials by state, best, running trials, failures."""

    name = "status"
    reads_only = True
    stored_spec_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", nargs="?", help="study name (omit to list studies)")
        _storage_arg(parser)
        parser.add_argument("--json", action="store_true", help="print the same as JSON")

    def run(self, args: argparse.Namespace) -> int:
        return _package("views").show_status(args.name, args.storage, as_json=args.json)


class Best(Command):
    """Print the best configuration, a file `python -m trainers` can train."""

    name = "best"
    reads_only = True
    stored_spec_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        parser.add_argument("--format", choices=("yaml", "json"), default="yaml")

    def run(self, args: argparse.Namespace) -> int:
        return _package("views").show_best(args.name, args.storage, as_format=args.format)


class Dashboard(Command):
    """Serve optuna-dashboard on the study storage (live curves, plots, trial artifacts)."""

    name = "dashboard"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _server_args(parser, port=8080, other_hosts="0.0.0.0 exposes it")

    def run(self, args: argparse.Namespace) -> int:
        serving = _serving(args, "the dashboard")  # refused before the storage is opened
        _package("views").serve_dashboard(resolve_url(args.storage), serving=serving,
                                          port=args.port)
        return EXIT_OK


class LrFind(Command):
    """LR range test (Smith) for a study's model and data; suggests the lr range."""

    name = "lr-find"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("study", help="study file (YAML)")
        parser.add_argument("--optimizer", help="test only this optimizer (default: each in "
                                                "the space, or the study's)")
        parser.add_argument("--start-lr", type=_positive_float, default=1e-7,
                            help="first lr of the ramp (default 1e-7)")
        parser.add_argument("--end-lr", type=_positive_float, default=10.0,
                            help="last lr of the ramp (default 10)")
        parser.add_argument("--iterations", type=_positive_int, default=300,
                            help="optimizer steps of the ramp (default 300)")
        parser.add_argument("--rule", choices=("minimum", "steepest"), default="minimum",
                            help="max lr at the smoothed loss's minimum (default) or where it "
                                 "falls fastest; min lr is max/10 either way")
        parser.add_argument("--out", help="folder for the plots and curves "
                                          "(default lr-find-<study name>)")
        parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")

    def run(self, args: argparse.Namespace) -> int:
        spec = _package("spec").load_spec(args.study)
        settings = {"start_lr": args.start_lr, "end_lr": args.end_lr,
                    "iterations": args.iterations, "rule": args.rule}
        _package("run").lr_find(spec, settings, out=Path(args.out) if args.out else None,
                                optimizer=args.optimizer, device=args.device)
        return EXIT_OK


class Retrain(Command):
    """Train the best config on train+validation and evaluate the test set, once per seed."""

    name = "retrain"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        parser.add_argument("--out", help="folder for weights, config and results "
                                          "(default retrain-<NAME>)")
        parser.add_argument("--epochs", type=_positive_int,
                            help="epochs to train (default: the study's budget.epochs)")
        parser.add_argument("--seeds", type=_positive_int, default=1,
                            help="independent runs (seeds) to average (default 1)")
        parser.add_argument("--trial", type=int, help="retrain this trial instead of the best")
        parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")

    def run(self, args: argparse.Namespace) -> int:
        _package("run").retrain_and_report(
            args.name, args.storage, out=Path(args.out) if args.out else None,
            epochs=args.epochs, seeds=args.seeds, trial=args.trial, device=args.device)
        return EXIT_OK


class Report(Command):
    """Write one self-contained HTML report of a study (plots, curves, top trials)."""

    name = "report"
    reads_only = True
    stored_spec_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        parser.add_argument("--out", default="report.html",
                            help="the HTML file to write (default report.html)")
        parser.add_argument("--top", type=_positive_int, default=10,
                            help="rows in the top-trials table (default 10)")

    def run(self, args: argparse.Namespace) -> int:
        return _package("views").write_report(args.name, args.storage, out=Path(args.out),
                                              top=args.top)


class List(Command):
    """List the models, datasets, optimizers… a study file may name, built in and installed."""

    name = "list"
    KINDS = ("models", "datasets", "optimizers", "schedules", "inits", "samplers", "pruners")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("kind", nargs="*", type=self._kind, metavar="KIND",
                            help=f"one or more of: {', '.join(self.KINDS)} (default: all)")

    def _kind(self, text: str) -> str:
        if text not in self.KINDS:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(self.KINDS)}, "
                                             f"got {text!r}")
        return text

    def run(self, args: argparse.Namespace) -> int:
        print(_package("views").choices_text(args.kind or list(self.KINDS)))
        return EXIT_OK


class Stop(Command):
    """Ask every worker of a study, on every machine, to checkpoint its trial and exit."""

    name = "stop"
    stored_spec_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        parser.add_argument("--wait", type=float, nargs="?", const=600.0, default=None,
                            metavar="SECONDS",
                            help="wait until no trial runs (default 600 s when given)")

    def run(self, args: argparse.Namespace) -> int:
        return _package("run").stop_study(args.name, args.storage, wait_s=args.wait)


class Delete(Command):
    """Delete a study with its trials' artifacts, checkpoints and lock file."""

    name = "delete"
    stored_spec_only = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    def run(self, args: argparse.Namespace) -> int:
        return _package("run").delete_study_files(args.name, args.storage, yes=args.yes)


class StorageProxy(Command):
    """Serve Optuna's gRPC storage proxy in front of the database, for very many workers."""

    name = "storage-proxy"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _server_args(parser, port=13000, other_hosts="0.0.0.0 for other hosts")

    def run(self, args: argparse.Namespace) -> int:
        serving = _serving(args, "the storage proxy")
        _package("storage").serve_proxy(args.storage, serving=serving, port=args.port)
        return EXIT_OK


class Slurm(Command):
    """Submit a study's workers as a Slurm job array (through submitit), one task per node."""

    name = "slurm"
    stored_spec_only = True  # the stored spec's width, read on a login node without torch

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _study_arg(parser)
        parser.add_argument("--nodes", type=_positive_int, default=1,
                            help="array tasks, each a node's worth of GPUs (default 1)")
        parser.add_argument("--gpus-per-node", type=int, default=1,
                            help="GPUs per task (default 1; 0: CPU nodes, see --workers)")
        parser.add_argument("--trials-per-gpu", type=_per_gpu, default="auto",
                            help="worker processes per GPU, or auto (the default): added while "
                                 "they fit, as `run` does")
        parser.add_argument("--workers", type=_positive_int,
                            help="CPU workers per task, with --gpus-per-node 0 (default 1)")
        parser.add_argument("--cpus-per-task", type=_positive_int,
                            help="CPU cores per task (default: Slurm's on GPU nodes, one per "
                                 "worker on CPU nodes)")
        parser.add_argument("--partition", help="Slurm partition (default: the cluster's)")
        parser.add_argument("--account", help="Slurm account to charge")
        parser.add_argument("--time", help="time limit per task, HH:MM:SS or D-HH:MM:SS "
                                           "(default 04:00:00); a task near it is requeued")
        parser.add_argument("--folder", help="batch script, pickles and logs, on a filesystem "
                                             "the nodes share (default slurm-<NAME>)")
        parser.add_argument("--dry-run", action="store_true",
                            help="print the batch script and each task's command; submit nothing")

    def run(self, args: argparse.Namespace) -> int:
        return _package("workers").submit_slurm(
            args.name, args.storage, dry_run=args.dry_run, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, trials_per_gpu=args.trials_per_gpu,
            workers=args.workers, cpus_per_task=args.cpus_per_task, partition=args.partition,
            account=args.account, time=args.time, folder=args.folder)


COMMANDS: list[Command] = [Validate(), Run(), Worker(), Status(), Best(), Dashboard(), LrFind(),
                           Retrain(), Report(), List(), Stop(), Delete(), StorageProxy(), Slurm()]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"hpsearch {version('hpsearch')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "hpsearch (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpsearch",
        description="Automated hyperparameter search for PyTorch models, built on Optuna.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        doc = (command.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(command.name, help=doc, description=doc)
        command.add_arguments(p)
        p.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quick_exit()
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad arguments
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    debug = args.debug or bool(os.environ.get("HPSEARCH_DEBUG"))
    if getattr(args, "tls_ca", None):  # for this process and the workers it starts
        os.environ[CA_ENV] = str(Path(args.tls_ca).expanduser().resolve())
    with for_cli():  # hpsearch's warnings and notices printed, as `warning: …` lines
        return _run(args, debug)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        with _names_trusted() if args.handler.stored_spec_only else nullcontext():
            if args.handler.reads_only:
                with_retry = _package("storage").with_retry
                return with_retry(lambda: args.handler.run(args),
                                  what=f"hpsearch {args.command}")
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


@functools.cache  # once a process, however many times main() runs in it
def _quick_exit() -> None:
    """Once every other exit handler has run (this one is registered first, so it runs last:
    tracking clients' handlers and the storages' closing, `search.storage`, run before it),
    collect what is garbage then, finalizers and all, and freeze the rest. The interpreter's
    final collections then skip the half-million objects torch and Optuna leave, which took
    seconds: a worker stopped by SIGTERM spent most of its exit in them."""
    atexit.register(_collect_then_freeze)


def _collect_then_freeze() -> None:
    gc.collect()
    gc.freeze()


def _names_trusted() -> AbstractContextManager[None]:
    from trainers import names_trusted

    return names_trusted()


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    hint = "" if debug else " (--debug shows the traceback)" if code == EXIT_FAILURE else ""
    print(f"error: {redact(message)}{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
