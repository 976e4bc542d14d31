"""The `modtag` command line: run the stack, scan images, run one component, validate policies."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ModtagError

EXIT_OK, EXIT_FAILED_JOBS, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MODTAG_LOG_LEVEL", "INFO"), format=_LOG_FORMAT)
    for chatty in ("httpx", "alembic"):  # a line per request or migration step drowns the command's output
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        _apply_overrides(args)
        return int(args.handler(args))
    except ModtagError as exc:
        print(f"modtag: {exc.message} [{exc.code}]", file=sys.stderr)
        return EXIT_USAGE if exc.code in ("settings_invalid", "config_invalid") else EXIT_ERROR
    except FileNotFoundError as exc:
        print(f"modtag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modtag", description="Self-hosted image moderation and tagging.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run Redis, the database, the API and workers on this machine")
    _stack_options(up)
    up.add_argument("--host", default=None, help="address the API listens on (default 127.0.0.1)")
    up.add_argument("--port", type=_port, default=None, help="API port (default 8000)")
    up.set_defaults(handler=cmd_up)

    scan = sub.add_parser("scan", help="judge every image under PATH... and print the decisions")
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    scan.add_argument("--api", default=None, help="submit to this API URL instead of starting a local stack")
    scan.add_argument("--policy", default="moderation")
    scan.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds to wait for results")
    scan.add_argument("--json", action="store_true", help="print the jobs as JSON instead of a table")
    scan.add_argument("--no-progress", action="store_true")
    _stack_options(scan)
    scan.set_defaults(handler=cmd_scan)

    api = sub.add_parser("api", help="run the HTTP API only")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=_port, default=None)
    api.set_defaults(handler=cmd_api)

    worker = sub.add_parser("worker", help="run one worker process (loads the models once)")
    worker.add_argument("--models", default=None, help=_MODELS_HELP)
    worker.add_argument("--concurrency", type=_positive_int, default=None, help="task threads (default: batch size)")
    worker.set_defaults(handler=cmd_worker)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = policy_sub.add_parser("validate", help="check policy files and print their versions")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(handler=cmd_policy_validate)

    reconcile = sub.add_parser("reconcile", help="re-enqueue jobs whose messages were lost, once")
    reconcile.set_defaults(handler=cmd_reconcile)
    return parser


_MODELS_HELP = "base, large, tiny-random, random-base, or a directory with caption/ vqa/ itm/ (MODTAG_MODELS)"


def _stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    parser.add_argument("--models", default=None, help=_MODELS_HELP)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the database, blobs and logs go")


def cmd_up(args: argparse.Namespace) -> int:
    from core.settings import get_settings
    from modtag.preflight import check_models_reachable
    from modtag.stack import Stack

    settings = get_settings()
    check_models_reachable(settings.models)
    stack = Stack(settings, host=args.host or settings.api_host, port=args.port, workers=args.workers)
    stop = _install_stop_signals()
    with stack:
        print(f"modtag is up: API {stack.api_url}  (docs {stack.api_url}/docs, metrics {stack.api_url}/metrics)")
        print(f"models {settings.models}, {args.workers} worker(s), data in {stack.data_dir}; Ctrl-C stops")
        sys.stdout.flush()
        while not stop.wait(0.5):
            stack._check_alive()
    print("modtag stopped")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    from modtag.scan import find_images, print_table, scan, to_json

    files = find_images(args.paths)
    if not files:
        print("modtag: no images found under " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_USAGE
    progress = not args.no_progress and not args.json
    if args.api:
        results = scan(args.api, files, policy=args.policy, timeout_s=args.timeout, progress=progress)
    else:
        from core.settings import get_settings
        from modtag.preflight import check_models_reachable
        from modtag.servers import free_port
        from modtag.stack import Stack

        settings = get_settings()
        check_models_reachable(settings.models)
        print(f"starting a local modtag stack (models: {settings.models})...", file=sys.stderr)
        with Stack(settings, port=free_port(), workers=args.workers) as stack:
            results = scan(stack.api_url, files, policy=args.policy, timeout_s=args.timeout, progress=progress)
    if args.json:
        print(to_json(results))
    else:
        print_table(results, sys.stdout)
    return EXIT_FAILED_JOBS if any(r.failed for r in results) else EXIT_OK


def cmd_api(args: argparse.Namespace) -> int:
    from api.app import run
    from core.settings import get_settings

    settings = get_settings()
    update: dict[str, Any] = {}
    if args.host:
        update["api_host"] = args.host
    if args.port is not None:
        update["api_port"] = args.port
    run(settings.model_copy(update=update))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from core.queues import Queue
    from core.settings import get_settings
    from worker.celery_app import app, install_runtime
    from worker.runtime import WorkerRuntime

    settings = get_settings()
    runtime = WorkerRuntime(settings)
    engine = runtime.load()  # fail here, with how to get the weights, before taking any job
    logging.getLogger("modtag").info("models loaded: %s", engine.describe())
    install_runtime(runtime)
    concurrency = args.concurrency or max(2, settings.batch_max_images)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            "--queues=" + ",".join(queue.value for queue in Queue),
            "--hostname=modtag@%h." + str(os.getpid()),
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return EXIT_OK


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from policies import load_policy

    status = EXIT_OK
    for path in args.files:
        try:
            policy = load_policy(path)
        except ModtagError as exc:
            print(f"{exc.message}", file=sys.stderr)
            status = EXIT_FAILED_JOBS
            continue
        checks = sum(len(category.checks) for category in policy.categories)
        print(
            f"{path}: ok: policy {policy.name!r} version {policy.version}, "
            f"{len(policy.categories)} categories, {checks} checks"
        )
    return status


def cmd_reconcile(_: argparse.Namespace) -> int:
    import redis

    from core.broker import make_celery
    from core.reconcile import reconcile_once
    from core.settings import get_settings

    settings = get_settings()
    report = reconcile_once(settings, make_celery(settings), redis.Redis.from_url(settings.redis_url))
    print(f"re-enqueued {report.requeued} queued, recovered {report.recovered} running, failed {report.failed}")
    return EXIT_OK


def _apply_overrides(args: argparse.Namespace) -> None:
    """Command-line flags become MODTAG_* variables, so the settings object and child processes agree."""
    from core.settings import get_settings

    if getattr(args, "models", None):
        os.environ["MODTAG_MODELS"] = args.models
    if getattr(args, "data_dir", None):
        os.environ["MODTAG_DATA_DIR"] = str(args.data_dir)
    get_settings.cache_clear()
    get_settings()  # fail now, naming the bad variable, rather than in a child process


def _install_stop_signals() -> Any:
    import threading

    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1 or value > 256:
        raise argparse.ArgumentTypeError(f"{value} is out of range (1 to 256)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)")
    return value
