"""The `modtag` command line: run the stack, scan images, run one component, manage API keys, validate policies."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from core import __version__
from core.errors import ImageError, InvalidField, ModtagError
from core.logs import configure_logging

if TYPE_CHECKING:
    from core.settings import Settings
    from modtag.client import ApiClient

EXIT_OK, EXIT_FAILED_JOBS, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
MAX_BENCH_BANK = 50_000_000  # 1.6 GB of hashes: about what a machine that runs the bench can hold twice
Number = TypeVar("Number", int, float)
# What the [worker] extra installs: a command that needs them says so in one line instead of a traceback.
_WORKER_MODULES = frozenset({"torch", "transformers", "numpy"})


def main(argv: Sequence[str] | None = None) -> int:
    # Whatever modtag writes (the SQLite file with the keys' hashes, blobs, logs) is its user's alone: 0600 / 0700.
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("text", os.environ.get("MODTAG_LOG_LEVEL", "INFO"))  # until the settings say which
    for chatty in ("httpx", "alembic"):  # a line per request or migration step drowns the command's output
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        settings = _settings(args)
        configure_logging(settings.log_format, os.environ.get("MODTAG_LOG_LEVEL", "INFO"))
        if getattr(args, "opens_database", False):
            _check_database(settings)
        return int(args.handler(args, settings))
    except ModtagError as exc:
        print(f"modtag: {exc.message} [{exc.code}]", file=sys.stderr)
        usage = exc.code in ("settings_invalid", "config_invalid") or isinstance(exc, InvalidField)
        return EXIT_USAGE if usage else EXIT_ERROR
    except FileNotFoundError as exc:
        print(f"modtag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if exc.name not in _WORKER_MODULES:
            raise
        print(
            f"modtag: `{args.command}` needs the worker's libraries ({exc.name} is not installed): "
            "pip install 'modtag[worker]' [missing_extra]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    from modtag.quotas import limit_value  # light: the argparse type of `quotas set`'s limits

    parser = argparse.ArgumentParser(prog="modtag", description="Self-hosted image moderation and tagging.")
    parser.add_argument("--version", action="version", version=f"modtag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run Redis, the database, the API and workers on this machine")
    _stack_options(up)
    _admin_key_option(up)
    up.add_argument("--host", default=None, help="address the API listens on (default 127.0.0.1)")
    up.add_argument("--port", type=_port, default=None, help="API port (default 8000)")
    up.set_defaults(handler=cmd_up, opens_database=True)

    scan = sub.add_parser("scan", help="judge every image and video under PATH... and print the decisions")
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    scan.add_argument("--api", default=None, help="submit to this API URL instead of starting a local stack")
    scan.add_argument(
        "--api-key", default=None, help="the key to send with --api (default MODTAG_API_KEY; role submit or admin)"
    )
    scan.add_argument("--policy", default="moderation")
    scan.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds to wait for results")
    scan.add_argument("--json", action="store_true", help="print the jobs as JSON instead of a table")
    scan.add_argument("--no-progress", action="store_true")
    scan.add_argument(
        "--wait",
        type=_wait_seconds,
        nargs="?",
        const=30,
        default=None,
        metavar="N",
        help="moderate now: ask the API to answer each image with its decision (`Prefer: wait=N`, default 30 s; "
        "the API caps it at MODTAG_MAX_PREFER_WAIT_S)",
    )
    _stack_options(scan)
    _admin_key_option(scan)
    scan.set_defaults(handler=cmd_scan)

    backfill = sub.add_parser(
        "backfill", help="submit a catalogue (CSV or JSON lines of url/path, id, context) to the bulk lane, resumably"
    )
    backfill.add_argument("file", type=Path, metavar="FILE", help="CSV with a header, or JSON lines")
    backfill.add_argument("--api", required=True, help="the modtag API's URL")
    backfill.add_argument(
        "--api-key", default=None, help="the key to send (default MODTAG_API_KEY; role submit or admin)"
    )
    backfill.add_argument(
        "--rate", type=_positive_float, default=10.0, help="submissions per second at most (default 10)"
    )
    backfill.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="results.jsonl and failures.jsonl, the state a rerun resumes from (default ./FILE-NAME.backfill)",
    )
    backfill.add_argument("--policy", default="moderation")
    backfill.add_argument("--no-progress", action="store_true")
    backfill.set_defaults(handler=cmd_backfill)

    api = sub.add_parser("api", help="run the HTTP API only")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=_port, default=None)
    api.set_defaults(handler=cmd_api, opens_database=True)

    worker = sub.add_parser("worker", help="run one worker process (loads the models once)")
    worker.add_argument("--models", default=None, help=_MODELS_HELP)
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help="task threads (default: MODTAG_WORKER_CONCURRENCY or three times the batch size)",
    )
    worker.set_defaults(handler=cmd_worker, opens_database=True)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = policy_sub.add_parser("validate", help="check policy files and print their versions")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.set_defaults(handler=cmd_policy_validate)
    replay = policy_sub.add_parser(
        "replay", help="re-decide stored jobs with a new policy version and print how decisions would change"
    )
    replay.add_argument("file", type=Path, metavar="NEW.yaml")
    replay.add_argument("--since", required=True, help="jobs decided since: ISO date/time or an age (7d, 12h)")
    replay.add_argument("--until", default=None, help="and before this moment (default: now)")
    replay.add_argument("--target", default=None, help="whose jobs (default: the policy it shadows, else its name)")
    replay.add_argument("--tenant", default=None, help="only this tenant's jobs")
    replay.add_argument("--limit", type=int, default=1000, help="at most this many jobs, oldest first (default 1000)")
    replay.add_argument("--all", action="store_true", help="list every job, not only those that would change")
    replay.add_argument("--json", action="store_true")
    replay.add_argument("--models", default=None, help=_MODELS_HELP)
    replay.add_argument(
        "--dtype",
        choices=_DTYPES,
        default=None,
        help="new checks' models at this dtype (MODTAG_DTYPE)",
    )
    replay.set_defaults(handler=cmd_policy_replay, opens_database=True)
    test = policy_sub.add_parser("test", help="run a policy on example images in allow/ review/ block/ folders")
    test.add_argument("file", type=Path, metavar="FILE")
    test.add_argument("cases", type=Path, metavar="CASES_DIR")
    test.add_argument("--json", action="store_true")
    test.add_argument("--models", default=None, help=_MODELS_HELP)
    test.add_argument("--dtype", choices=_DTYPES, default=None, help="the models at this dtype (MODTAG_DTYPE)")
    test.add_argument(
        "--compare-dtype",
        choices=_DTYPES,
        default=None,
        metavar="DTYPE",
        help="also run the cases at DTYPE and print both decisions side by side (int8: CPU only)",
    )
    test.set_defaults(handler=cmd_policy_test)
    calibrate = policy_sub.add_parser(
        "calibrate", help="thresholds from the tenant's review labels: a table, curves (PNG) and a new policy version"
    )
    calibrate.add_argument("policy", metavar="P", help="the loaded policy's name")
    calibrate.add_argument("--since", default="30d", help="labels given since: ISO date/time or an age (default 30d)")
    calibrate.add_argument(
        "--target-precision", type=_unit_interval, default=0.95, help="precision a block threshold must reach (0.95)"
    )
    calibrate.add_argument(
        "--target-recall", type=_unit_interval, default=0.9, help="recall a review threshold must keep (0.9)"
    )
    calibrate.add_argument("--write", type=Path, default=None, metavar="NEW.yaml", help="write the calibrated policy")
    calibrate.add_argument("--name", default=None, help="the written policy's name (P-calibrated)")
    calibrate.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write a PNG curve per category")
    calibrate.add_argument("--json", action="store_true", help="print each category's calibration as JSON")
    calibrate.add_argument("--api", required=True, help="the API URL")
    calibrate.add_argument("--api-key", default=None, help="the key to send (default MODTAG_API_KEY)")
    calibrate.set_defaults(handler=cmd_policy_calibrate)

    listing_cmd = sub.add_parser("listing", help="marketplace listings")
    listing_sub = listing_cmd.add_subparsers(dest="listing_command", required=True, metavar="ACTION")
    check = listing_sub.add_parser("check", help="check a listing's photos against its title, description, attributes")
    check.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    check.add_argument("--title", required=True)
    check.add_argument("--description", default=None)
    check.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE", help="e.g. --attr color=red")
    check.add_argument("--policy", default="listing")
    check.add_argument("--api", default=None, help="submit to this API URL instead of starting a local stack")
    check.add_argument("--api-key", default=None, help="the key to send with --api (default MODTAG_API_KEY)")
    check.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds to wait for the verdict")
    check.add_argument("--json", action="store_true", help="print the listing as JSON")
    _stack_options(check)
    _admin_key_option(check)
    check.set_defaults(handler=cmd_listing_check)

    banks_cmd = sub.add_parser("banks", help="hash banks of known images")
    banks_sub = banks_cmd.add_subparsers(dest="banks_command", required=True, metavar="ACTION")
    bank_import = banks_sub.add_parser("import", help="add a hash list (HMA's format or CSV) to a bank (admin key)")
    bank_import.add_argument("name", metavar="NAME")
    bank_import.add_argument(
        "file", type=Path, metavar="FILE", help="HMA's `<signal_type> <signal>` per line, or a CSV (see README)"
    )
    bank_import.add_argument(
        "--format", choices=("hma", "csv"), default=None, help="the file's format (default: csv for *.csv, else hma)"
    )
    bank_import.add_argument(
        "--signal-type",
        choices=("pdq", "sha256", "video_sha256"),
        default=None,
        help="the type of lines that give a hash alone (an HMA file of bare hashes, a CSV without a header)",
    )
    bank_import.add_argument("--create", action="store_true", help="create the bank first")
    bank_import.add_argument(
        "--bank-kind", choices=("block", "allow"), default="block", help="with --create: the new bank's kind (block)"
    )
    bank_import.add_argument("--no-progress", action="store_true")
    bank_import.add_argument("--api", required=True, help="the API URL")
    bank_import.add_argument("--api-key", default=None, help="the key to send (default MODTAG_API_KEY)")
    bank_import.set_defaults(handler=cmd_banks_import)
    bank_export = banks_sub.add_parser("export", help="write a bank's hashes in HMA's format or as CSV (admin key)")
    bank_export.add_argument("name", metavar="NAME")
    bank_export.add_argument("--format", choices=("hma", "csv"), default="hma", help="the file's format (hma)")
    bank_export.add_argument("--out", type=Path, default=None, help="the file to write (default: standard output)")
    bank_export.add_argument("--api", required=True, help="the API URL")
    bank_export.add_argument("--api-key", default=None, help="the key to send (default MODTAG_API_KEY)")
    bank_export.set_defaults(handler=cmd_banks_export)

    quotas_cmd = sub.add_parser("quotas", help="tenants' submission quotas: list, show, set, delete (admin key)")
    quotas_sub = quotas_cmd.add_subparsers(dest="quotas_command", required=True, metavar="ACTION")
    quota_actions = {
        "list": quotas_sub.add_parser("list", help="the settings' limits and every tenant's override"),
        "show": quotas_sub.add_parser("show", help="a tenant's limits in force, and which the override sets"),
        "set": quotas_sub.add_parser("set", help="change the limits named, keeping the tenant's other overrides"),
        "delete": quotas_sub.add_parser("delete", help="remove the tenant's override: the settings apply again"),
    }
    for action, quota_parser in quota_actions.items():
        if action != "list":
            quota_parser.add_argument("tenant", metavar="TENANT")
        quota_parser.add_argument("--api", required=True, help="the API URL")
        quota_parser.add_argument("--api-key", default=None, help="an admin key (default MODTAG_API_KEY)")
        quota_parser.add_argument("--json", action="store_true", help="print the API's JSON")
        quota_parser.set_defaults(handler=cmd_quotas, quota_action=action)
    for flag in ("rate", "burst", "bulk-rate", "bulk-burst", "daily-cap"):
        quota_actions["set"].add_argument(
            f"--{flag}", type=limit_value, default=None, metavar="N|unlimited|default",
            help="a number, unlimited, or default (the setting applies)",
        )  # fmt: skip

    labels_cmd = sub.add_parser("labels", help="the review labels of the tenant")
    labels_sub = labels_cmd.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    export = labels_sub.add_parser("export", help="labelled jobs as JSON lines, with their images, into DIR")
    export.add_argument("directory", type=Path, metavar="DIR")
    export.add_argument("--since", default="30d", help="labels given since: ISO date/time or an age (default 30d)")
    export.add_argument("--no-images", action="store_true", help="the JSON lines only")
    export.add_argument("--no-progress", action="store_true")
    export.add_argument("--api", required=True, help="the API URL")
    export.add_argument("--api-key", default=None, help="an admin key (default MODTAG_API_KEY)")
    export.set_defaults(handler=cmd_labels_export)

    reconcile = sub.add_parser("reconcile", help="re-enqueue jobs whose messages were lost, once")
    reconcile.set_defaults(handler=cmd_reconcile, opens_database=True)

    migrate_cmd = sub.add_parser(
        "migrate", help="bring the database to the newest schema, once (a deployment's migration job)"
    )
    migrate_cmd.set_defaults(handler=cmd_migrate, opens_database=True)

    int8_calibrate = sub.add_parser(
        "int8-calibrate",
        help="measure int8's static input scales on your own photos; write the file MODTAG_INT8_CALIBRATION names",
    )
    int8_calibrate.add_argument("photos", nargs="+", type=Path, metavar="PHOTO")
    int8_calibrate.add_argument("--out", type=Path, required=True, metavar="FILE", help="the calibration file to write")
    int8_calibrate.add_argument("--models", default=None, help=_MODELS_HELP)
    int8_calibrate.set_defaults(handler=cmd_int8_calibrate)

    bench = sub.add_parser("bench", help="time the engine against the stock per-call way; print a JSON report")
    bench.add_argument(
        "--models", default="random-base", help="random-base (default; no download), base, large or a directory"
    )
    bench.add_argument(
        "--models-cache",
        type=Path,
        default=None,
        help="where random models are built (default: MODTAG_MODELS_CACHE_DIR)",
    )
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    bench.add_argument(
        "--dtype",
        default="auto",
        choices=_DTYPES,
        help="the fast dtype (auto: bf16 where the hardware computes it natively, fp16 on older GPUs)",
    )
    bench.add_argument("--batch-size", type=_positive_int, default=8, help="images per engine call (default 8)")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: one per core)")
    bench.add_argument("--images", type=_positive_int, default=8, help="photos in the workload (default 8)")
    bench.add_argument(
        "--baseline-images", type=_positive_int, default=None, help="run the slow baseline on the first K only"
    )
    bench.add_argument("--skip-baseline", action="store_true", help="no baseline: no speedups or fp32 parity")
    bench.add_argument("--repeat", type=_positive_int, default=2, help="timed engine runs; the best counts (default 2)")
    bench.add_argument("--through-stack", action="store_true", help="also time jobs through API, Redis, worker, DB")
    bench.add_argument(
        "--stack-jobs", type=_positive_int, default=48, help="jobs submitted with --through-stack (default 48)"
    )
    bench.add_argument(
        "--tags",
        action="store_true",
        help="instead: what tags and attribute checks cost (text features once, vision, ITC + ITM re-rank, "
        "the naive ITM over every tag, answer ranking), at the fast dtype; no baseline",
    )
    bench.add_argument(
        "--naive-images", type=_positive_int, default=1, help="with --tags: photos for ITM over every tag (default 1)"
    )
    bench.add_argument(
        "--precision",
        action="store_true",
        help="instead: the fast dtype's drift from float32 (vision output, ITM, scores, caption tokens) with and "
        "without mixed precision, and their times interleaved (--repeat rounds); no baseline",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="also time the vision stage through OpenVINO and ONNX Runtime (pip install 'modtag[peers]')",
    )
    bench.add_argument(
        "--banks",
        type=_bank_size,
        default=None,
        metavar="N",
        help="instead: time PDQ bank lookups in a bank of N random hashes (build time, memory, lookup per image)",
    )
    bench.add_argument(
        "--examples",
        type=_bank_size,
        nargs="?",
        const=100_000,
        default=None,
        metavar="N",
        help="instead: time embedding lookups (in memory, SQLite exact, pgvector exact and HNSW with its recall) "
        "against 1,000, 100,000, 1,000,000 up to N stored embeddings (default N 100,000: a few minutes); "
        "PostgreSQL from --database-url or a temporary pgserver",
    )
    bench.add_argument("--database-url", default=None, help="with --examples: the PostgreSQL to time pgvector on")
    bench.add_argument(
        "--ocr",
        action="store_true",
        help="instead: the OCR reader against RapidOCR per image (--images, --repeat rounds, --batch-size, --threads)",
    )
    bench.add_argument(
        "--video",
        action="store_true",
        help="instead: a generated 1080p clip sampled (MODTAG_VIDEO_* settings) and judged, against every second's "
        "frame through the engine; seconds per minute of video, frames kept, memory",
    )
    bench.add_argument(
        "--video-seconds",
        type=_video_seconds,
        default=60,
        help="with --video: the clip's length (default 60, at most 600)",
    )
    bench.add_argument("--json", action="store_true", help="print only the JSON report")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(handler=cmd_bench)

    keys = sub.add_parser("keys", help="API keys: create, list, revoke (works on the database directly)")
    keys.set_defaults(opens_database=True)
    data_dir_help = "the data directory of `modtag up --data-dir` whose database to use (default: the user's)"
    keys.add_argument("--data-dir", type=Path, default=None, help=data_dir_help)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key and print it (once: only its hash is stored)")
    create.add_argument("--role", required=True, choices=["submit", "review", "admin"])
    create.add_argument("--tenant", required=True, help="the tenant whose jobs the key sees (one install: `default`)")
    create.add_argument("--name", default=None, help="who or what uses the key, shown in listings and the audit log")
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    create.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=data_dir_help)
    create.set_defaults(handler=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (never the secrets)")
    listing.add_argument("--tenant", default=None)
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=data_dir_help)
    listing.set_defaults(handler=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id; it stops working at once, sign-ins too")
    revoke.add_argument("key_id", metavar="ID")
    revoke.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=data_dir_help)
    revoke.set_defaults(handler=cmd_keys_revoke)
    return parser


_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")  # MODTAG_DTYPE's values
_MODELS_HELP = "base, large, tiny-random, random-base, or a directory with caption/ vqa/ itm/ (MODTAG_MODELS)"


def _stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    parser.add_argument("--models", default=None, help=_MODELS_HELP)
    parser.add_argument("--data-dir", type=Path, default=None, help="where the database, blobs and logs go")


def _admin_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="use the admin key in FILE instead of creating one (or MODTAG_ADMIN_KEY); a file keeps it out of `ps`",
    )
    # The old flag put the key in `ps` output: refused with where to put it instead (and never taken as an
    # abbreviation of --admin-key-file).
    parser.add_argument("--admin-key", action=_RefusedArgvKey, help=argparse.SUPPRESS)


class _RefusedArgvKey(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *_: object, **__: object) -> None:
        parser.error("--admin-key is gone (a key in argv shows in `ps`): use --admin-key-file FILE or MODTAG_ADMIN_KEY")


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from modtag.preflight import check_models_reachable
    from modtag.stack import Stack

    check_models_reachable(settings.models)
    stack = Stack(settings, host=args.host or settings.api_host, port=args.port, workers=args.workers)
    stop = _install_stop_signals()
    with stack:
        lines = [
            f"modtag is up: API {stack.api_url}  (docs {stack.api_url}/docs, metrics {stack.api_url}/metrics)",
            f"models {settings.models}, {args.workers} worker(s), data in {stack.data_dir}; Ctrl-C stops",
        ]
        if stack.admin_key and settings.admin_key is None:
            lines.append(f"admin key: {stack.admin_key}")
            lines.append("  (shown once; send it as `Authorization: Bearer <key>`; the previous one is revoked)")
        elif stack.admin_key:
            lines.append("admin key: the one given by --admin-key-file / MODTAG_ADMIN_KEY")
        else:
            lines.append("auth is off (MODTAG_AUTH=false): every caller is an admin; for development only")
        lines.append(f"dashboard: {stack.api_url}/dashboard (sign in with the admin key)")
        # One write: a script watching for "modtag is up" finds the key in the same read.
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            stack.supervise()  # a worker that died is restarted; the API's or Redis's death stops the stack
    print("modtag stopped")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    from modtag.scan import find_images, print_table, scan, to_json

    files = find_images(args.paths)
    if not files:
        print("modtag: no images found under " + ", ".join(map(str, args.paths)), file=sys.stderr)
        return EXIT_USAGE
    progress = not args.no_progress and not args.json
    with _api_client(args, settings, timeout_s=60) as client:
        results = scan(client, files, policy=args.policy, timeout_s=args.timeout, progress=progress, wait_s=args.wait)
    _print_report(args.json, lambda: to_json(results), lambda out: print_table(results, out))
    return EXIT_FAILED_JOBS if any(r.failed for r in results) else EXIT_OK


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from modtag.backfill import backfill

    out = args.out or Path(f"{args.file.name}.backfill")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stop = _install_stop_signals()  # Ctrl-C or SIGTERM: the row being sent is finished and recorded, then it stops
    try:
        with _api_client(args, settings, timeout_s=60) as client:
            report = backfill(
                client,
                args.file,
                out,
                policy=args.policy,
                rate_per_s=args.rate,
                progress=not args.no_progress,
                stop=stop,
            )
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    print(
        f"backfill of {args.file}: {report.submitted} submitted, {report.failed} failed, {report.skipped} done "
        f"before; results in {out}/results.jsonl, failures in {out}/failures.jsonl"
        + ("; interrupted: run the same command again to resume" if report.interrupted else "")
    )
    if report.interrupted:
        return 130
    return EXIT_FAILED_JOBS if report.failed else EXIT_OK


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from api.app import run

    update: dict[str, Any] = {}
    if args.host:
        update["api_host"] = args.host
    if args.port is not None:
        update["api_port"] = args.port
    run(settings.model_copy(update=update))
    return EXIT_OK


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from core.queues import Queue
    from worker.celery_app import consume, install_runtime, serve_metrics
    from worker.pixels import limit_malloc_arenas
    from worker.runtime import WorkerRuntime

    limit_malloc_arenas(settings.worker_malloc_arenas)  # before any thread starts: the models' and the pool's
    serve_metrics(settings)  # first: a taken port stops the worker before the models load
    runtime = WorkerRuntime.from_settings(settings)
    runtime.load()  # fail here, with how to get the weights, before taking any job
    logging.getLogger("modtag").info("models loaded: %s", runtime.inference.describe())
    install_runtime(runtime)
    # Three batches of threads: while one batch computes, the next one's images are fetched, decoded and waiting,
    # so batches leave full instead of as each thread comes back from storing its last result; and while bulk jobs
    # hold those two, a batch of threads stays free for interactive jobs (worker/bulk_gate.py).
    concurrency = args.concurrency or settings.resolved_worker_concurrency
    # Celery's exit status, which `worker_main` drops: a consumer that cannot go on ends the process non-zero.
    return consume(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency}",
            "--queues=" + ",".join(queue.value for queue in Queue),
            "--hostname=modtag@%h." + str(os.getpid()),
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        bulk_held=settings.resolved_worker_bulk_held(concurrency),
    )


def cmd_policy_validate(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_policy_replay(args: argparse.Namespace, settings: Settings) -> int:
    from core.db import migrate
    from core.moments import parse_since
    from modtag.policytools import print_replay, replay_json
    from policies import load_policy
    from worker.replay import replay_policy

    try:
        since = parse_since(args.since)
        until = parse_since(args.until) if args.until else None
    except ValueError as exc:
        raise InvalidField(str(exc), code="invalid_field") from None
    if args.limit < 1:
        raise InvalidField("--limit must be at least 1", code="invalid_field")
    policy = load_policy(args.file)
    settings = _at_dtype(settings, args.dtype)
    migrate(settings.resolved_database_url)
    report = replay_policy(
        policy, settings, since=since, until=until, target=args.target, tenant=args.tenant, limit=args.limit
    )
    _print_report(args.json, lambda: replay_json(report), lambda out: print_replay(report, out, all_jobs=args.all))
    return EXIT_OK


def cmd_policy_test(args: argparse.Namespace, settings: Settings) -> int:
    from modtag.policytools import cases_json, compared_cases_json, print_cases, print_compared_cases
    from modtag.preflight import check_models_reachable
    from policies import load_policy
    from worker.replay import run_cases

    policy = load_policy(args.file)
    if args.cases.is_dir():  # else run_cases says what the cases directory must be
        check_models_reachable(settings.models)  # offline: fail in seconds with what to do, as `scan` does
    settings = _at_dtype(settings, args.dtype)
    results = run_cases(policy, args.cases, settings)
    if args.compare_dtype:
        # The same cases at a second dtype, so a user sees what int8 (say) would decide on their own images.
        compared = run_cases(policy, args.cases, _at_dtype(settings, args.compare_dtype))
        dtypes = (settings.dtype, args.compare_dtype)
        _print_report(
            args.json,
            lambda: compared_cases_json(results, compared, dtypes),
            lambda out: print_compared_cases(results, compared, dtypes, out),
        )
        return EXIT_OK if all(result.passed for result in [*results, *compared]) else EXIT_FAILED_JOBS
    _print_report(args.json, lambda: cases_json(results), lambda out: print_cases(results, out))
    return EXIT_OK if all(result.passed for result in results) else EXIT_FAILED_JOBS


def cmd_policy_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from modtag.calibrate import (
        calibrated_policy,
        calibrations,
        calibrations_json,
        print_calibrations,
        read_policy,
        write_plots,
    )

    _check_moment("--since", args.since)
    name = args.name or f"{args.policy}-calibrated"[:64]
    with _api_client(args, settings, timeout_s=120) as client:
        policy = read_policy(client, args.policy)
        found = calibrations(
            client, policy, since=args.since, block_precision=args.target_precision, review_recall=args.target_recall
        )
    _print_report(args.json, lambda: calibrations_json(found), lambda out: print_calibrations(found, out))
    notes = []
    try:
        if args.plots is not None:
            plots = write_plots(found, args.plots)
            notes.append(f"{len(plots)} curve(s) written to {args.plots}")
        if args.write is not None:
            text, written = calibrated_policy(policy, found, name)
            args.write.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"modtag: cannot write {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.write is not None:
        notes.append(
            f"{args.write}: policy {written.name!r} version {written.version}, a shadow of {written.shadows!r}; "
            f"replay it: modtag policy replay {args.write} --since {args.since}"
        )
    for note in notes:
        print(note, file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_quotas(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from modtag import quotas

    changes = {name: getattr(args, name) for name in quotas.FIELDS if getattr(args, name, None) is not None}
    if args.quota_action == "set" and not changes:
        print("modtag: quotas set: name at least one limit (--rate, --burst, --bulk-rate, ...)", file=sys.stderr)
        return EXIT_USAGE
    with _api_client(args, settings, timeout_s=30) as client:
        try:
            if args.quota_action == "list":
                page = quotas.list_quotas(client)
            elif args.quota_action == "show":
                quota = quotas.read_quota(client, args.tenant)
            elif args.quota_action == "set":
                quota = quotas.set_quota(client, args.tenant, changes)
            else:
                quota = quotas.delete_quota(client, args.tenant)
        except quotas.QuotaRefused as exc:
            print(f"modtag: quotas {args.quota_action}: {exc}", file=sys.stderr)
            return EXIT_ERROR
    if args.quota_action == "list":
        _print_report(args.json, lambda: json.dumps(page, indent=2), lambda out: quotas.write_page(page, out))
    else:
        _print_report(args.json, lambda: json.dumps(quota, indent=2), lambda out: quotas.write_quota(quota, out))
    return EXIT_OK


def cmd_labels_export(args: argparse.Namespace, settings: Settings) -> int:
    from modtag.labels import export_labels

    _check_moment("--since", args.since)
    try:
        with _api_client(args, settings, timeout_s=120) as client:
            report = export_labels(
                client, args.directory, since=args.since, images=not args.no_images, progress=not args.no_progress
            )
    except OSError as exc:
        print(f"modtag: cannot write {exc.filename or args.directory}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"{report.jobs} labelled jobs written to {report.path}, {report.images} images in {report.images_dir}"
        + (f", {report.missing} images not available ({report.why_missing})" if report.missing else "")
    )
    return EXIT_OK


def _check_moment(flag: str, value: str) -> None:
    from core.moments import parse_since

    try:
        parse_since(value)
    except ValueError as exc:
        raise InvalidField(f"{flag}: {exc}", code="invalid_field") from None


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 and at most 1")
    return value


def _at_dtype(settings: Settings, dtype: str | None) -> Settings:
    return settings.model_copy(update={"dtype": dtype}) if dtype else settings


def cmd_listing_check(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from modtag.listing import check_listing, listing_failed, parse_attributes, print_listing

    missing = [path for path in args.images if not path.is_file()]
    if missing:
        print(f"modtag: not a file: {', '.join(map(str, missing))}", file=sys.stderr)
        return EXIT_USAGE
    attributes = parse_attributes(args.attr)
    options = {
        "title": args.title,
        "description": args.description,
        "attributes": attributes,
        "policy": args.policy,
        "timeout_s": args.timeout,
    }
    with _api_client(args, settings, timeout_s=120) as client:
        listing = check_listing(client, args.images, **options)
    _print_report(
        args.json,
        lambda: json.dumps(listing, indent=2, sort_keys=True),
        lambda out: print_listing(listing, args.images, out),
    )
    return EXIT_FAILED_JOBS if listing_failed(listing) else EXIT_OK


def cmd_int8_calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from core.images import ImageLimits, decode_image
    from modtag.bench.common import PROBES, TEXTS
    from worker.families.blip.calibration import calibrate
    from worker.families.blip.engine import INT8_STAGES, Engine, ImageRequest
    from worker.families.blip.models import load_models

    limits = ImageLimits.from_settings(settings)
    photos = []
    for path in args.photos:
        try:
            photos.append(decode_image(path.read_bytes(), limits))
        except ImageError as exc:
            raise ImageError(f"{path}: {exc.message}", code=exc.code) from None
    loaded = load_models(
        settings.models,
        {"caption", "vqa", "itm"},
        cache_dir=settings.resolved_models_cache_dir,
        device=settings.device,
        dtype="int8",
    )
    # Every stage at int8, so that every int8 layer sees the photos; the bench's questions and texts exercise the
    # text encoders as a policy's probes and matches do.
    engine = Engine(loaded, int8_stages=INT8_STAGES)
    requests = [ImageRequest(photo, probes=PROBES, texts=TEXTS) for photo in photos]
    calibration = calibrate(engine, requests, batch_size=settings.batch_max_images, models=settings.models)
    calibration.save(args.out)
    layers = sum(len(ranges.ranges) for ranges in calibration.roles.values())
    print(
        f"calibrated {layers} int8 layers of {', '.join(calibration.roles)} on {len(photos)} photos; wrote {args.out}"
    )
    print(f"use it: MODTAG_DTYPE=int8 MODTAG_INT8_CALIBRATION={args.out}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    import json

    if args.banks is not None:
        from modtag.bench.banks import format_banks_report, run_banks_bench

        banks_report = run_banks_bench(args.banks)
        if not args.json:
            print(format_banks_report(banks_report) + "\n")
        print(json.dumps(banks_report, indent=2))
        return EXIT_OK
    if args.examples is not None:
        from modtag.bench.examples import ExamplesBenchOptions, format_examples_report, run_examples_bench

        examples_options = ExamplesBenchOptions(
            args.examples, database_url=args.database_url, progress=not args.no_progress
        )
        examples_report = run_examples_bench(examples_options)
        if not args.json:
            print(format_examples_report(examples_report) + "\n")
        print(json.dumps(examples_report, indent=2))
        return EXIT_OK
    if args.ocr:
        from modtag.bench.ocr import OcrBenchOptions, format_ocr_report, run_ocr_bench

        ocr = OcrBenchOptions(args.images, args.repeat, args.batch_size, args.threads, not args.no_progress)
        ocr_report = run_ocr_bench(ocr)
        if not args.json:
            print(format_ocr_report(ocr_report) + "\n")
        print(json.dumps(ocr_report, indent=2))
        return EXIT_OK

    from modtag.bench import BenchOptions, format_report, run_bench

    if args.video:
        return _bench_video(args, settings)
    options = BenchOptions(
        cache_dir=args.models_cache or settings.resolved_models_cache_dir,
        models=args.models,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        threads=args.threads,
        images=args.images,
        baseline_images=args.baseline_images,
        repeat=args.repeat,
        skip_baseline=args.skip_baseline,
        through_stack=args.through_stack,
        stack_jobs=args.stack_jobs,
        progress=not args.no_progress,
        tags=args.tags,
        naive_images=args.naive_images,
        peers=args.peers,
    )
    if args.precision:
        from modtag.bench.precision import format_precision_report, run_precision_bench

        precision_report = run_precision_bench(options)
        if not args.json:
            print(format_precision_report(precision_report) + "\n")
        print(json.dumps(precision_report, indent=2))
        return EXIT_OK
    report = run_bench(options)
    if not args.json:
        print(format_report(report) + "\n")
    print(json.dumps(report, indent=2))
    return EXIT_OK


def _bench_video(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from core.video import Sampling
    from modtag.bench import BenchOptions
    from modtag.bench.video import VideoBenchOptions, format_video_report, run_video_bench

    options = BenchOptions(
        cache_dir=args.models_cache or settings.resolved_models_cache_dir,
        models=args.models,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        threads=args.threads,
        progress=not args.no_progress,
    )
    video = VideoBenchOptions(seconds=args.video_seconds, sampling=Sampling.from_settings(settings))
    report = run_video_bench(options, video)
    if not args.json:
        print(format_video_report(report) + "\n")
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_banks_import(args: argparse.Namespace, settings: Settings) -> int:
    from core.errors import ModtagError
    from core.hashexchange import ExchangeFormat
    from modtag.banks import BankImportError, guess_format, import_list, read_list

    fmt = ExchangeFormat(args.format) if args.format else guess_format(args.file)
    try:
        found = read_list(args.file, fmt, args.signal_type)
    except OSError as exc:
        print(f"modtag: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModtagError as exc:
        print(f"modtag: {args.file}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    with _api_client(args, settings, timeout_s=120) as client:
        if args.create:
            reply = client.create_bank(args.name, kind=args.bank_kind)
            if reply.status not in (201, 409):
                print(f"modtag: cannot create bank {args.name!r}: {reply.body.get('detail')}", file=sys.stderr)
                return EXIT_ERROR
        added = skipped = 0
        try:
            for count, already in import_list(client, args.name, found, progress=not args.no_progress):
                added += count
                skipped += already
        except BankImportError as exc:
            print(f"modtag: bank {args.name!r}: {exc} (after {added} added)", file=sys.stderr)
            return EXIT_ERROR
    unsupported = ", ".join(f"{count} {kind}" for kind, count in sorted(found.unsupported.items()))
    print(
        f"bank {args.name}: {added} hashes added, {skipped} skipped (already in the bank)"
        + (f", not imported (signal types modtag does not match): {unsupported}" if unsupported else "")
    )
    return EXIT_OK


def cmd_banks_export(args: argparse.Namespace, settings: Settings) -> int:
    with _api_client(args, settings, timeout_s=300) as client:
        if args.out is None:
            reply = client.export_bank(args.name, sys.stdout.buffer, fmt=args.format)
        else:
            partial = args.out.with_name(args.out.name + ".partial")
            with partial.open("wb") as out:
                reply = client.export_bank(args.name, out, fmt=args.format)
            if reply.status == 200:
                partial.replace(args.out)  # a file that is there is whole
            else:
                partial.unlink()
    if reply.status != 200:
        print(f"modtag: bank {args.name!r}: {reply.body.get('detail')} ({reply.body.get('code')})", file=sys.stderr)
        return EXIT_ERROR
    if args.out is not None:
        print(f"bank {args.name}: {reply.body['bytes']} bytes written to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_reconcile(_: argparse.Namespace, settings: Settings) -> int:
    import redis

    from core.broker import make_celery
    from core.reconcile import reconcile_once

    report = reconcile_once(settings, make_celery(settings), redis.Redis.from_url(settings.redis_url))
    print(f"re-enqueued {report.requeued} queued, recovered {report.recovered} running, failed {report.failed}")
    return EXIT_OK


def cmd_migrate(_: argparse.Namespace, settings: Settings) -> int:
    from core.db import migrate, schema_revision

    # Concurrent runs are safe: PostgreSQL's advisory lock (SQLite's file lock) lets one migrate at a time.
    migrate(settings.resolved_database_url)
    print(f"database at revision {schema_revision(settings.resolved_database_url)}")
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from core.auth import cli_principal, create_key, key_public

    with _keys_session(settings) as session:
        actor = cli_principal(args.tenant)
        row, secret = create_key(
            session, role=args.role, tenant=args.tenant, name=args.name or f"{args.role} key", actor=actor
        )
    if args.json:
        print(json.dumps({"key": secret, **key_public(row)}, indent=2))
        return EXIT_OK
    print(f"created {row.role} key {row.id} ({row.prefix}, {row.name!r}) for tenant {row.tenant!r}")
    print(f"key: {secret}")
    print("this is the only time the key is shown: store it now. Send it as `Authorization: Bearer <key>`.")
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from core.auth import check_tenant, key_public, list_keys

    with _keys_session(settings) as session:
        rows = [key_public(row) for row in list_keys(session, check_tenant(args.tenant) if args.tenant else None)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    header = ("ID", "PREFIX", "ROLE", "TENANT", "NAME", "CREATED", "LAST USED", "REVOKED")
    table = [header] + [
        (
            str(row["id"]), str(row["prefix"]), str(row["role"]), str(row["tenant"]), str(row["name"]),
            _short_time(row["created_at"]), _short_time(row["last_used_at"]), _short_time(row["revoked_at"]),
        )
        for row in rows
    ]  # fmt: skip
    widths = [min(max(len(line[i]) for line in table), 40) for i in range(len(header))]
    for line in table:
        print("  ".join(cell[:40].ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from core.auth import cli_principal, revoke_key

    with _keys_session(settings) as session:
        row = revoke_key(session, args.key_id.strip(), cli_principal("default"))
    print(f"revoked {row.role} key {row.id} ({row.prefix}, {row.name!r}) of tenant {row.tenant!r}")
    return EXIT_OK


def _keys_session(settings: Settings) -> Any:
    from sqlalchemy.engine import make_url

    from core.db import migrate, session_scope
    from core.settings import prepare_data_dir

    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        prepare_data_dir(settings)
    # On stderr, so --json stays parseable: a key made in another database than the API's is refused by it.
    print(f"database: {make_url(url).render_as_string(hide_password=True)}", file=sys.stderr)
    migrate(url)
    return session_scope(url)


def _check_database(settings: Settings) -> None:
    """A database server that cannot be reached is one line and exit status 3, not a driver's traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import ping

    url = settings.resolved_database_url
    if url.startswith("sqlite"):  # a local file: made on first use, never unreachable
        return
    try:
        ping(url)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        shown = make_url(url).render_as_string(hide_password=True)
        raise ModtagError(
            f"cannot reach the database at {shown}: {reason}. Is it running, and is MODTAG_DATABASE_URL right?",
            code="database_unavailable",
        ) from None


def _short_time(value: object) -> str:
    return str(value)[:19].replace("T", " ") if value else "-"


def _settings(args: argparse.Namespace) -> Settings:
    """The settings of this command: the environment, with the command-line flags above it.

    Read before anything starts, so a bad variable fails now, named, rather than in a child process.
    Child processes get these settings from the stack (modtag/stack.py), never through this process's
    environment.
    """
    from core.settings import load_settings

    flags = {name: getattr(args, name, None) for name in ("models", "data_dir")}
    key_file: Path | None = getattr(args, "admin_key_file", None)
    if key_file is not None:
        try:
            flags["admin_key"] = key_file.read_text().strip()
        except OSError as exc:
            raise InvalidField(
                f"cannot read --admin-key-file {key_file}: {exc.strerror or exc}", code="config_invalid"
            ) from None
    return load_settings(**{name: value for name, value in flags.items() if value})


@contextlib.contextmanager
def _api_client(args: argparse.Namespace, settings: Settings, *, timeout_s: float) -> Iterator[ApiClient]:
    """A client of the API at --api (with --api-key or MODTAG_API_KEY), else of a local stack run for the command."""
    from modtag.client import ApiClient

    if args.api:
        key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
        with ApiClient(args.api, key=key, timeout_s=timeout_s) as client:
            yield client
        return
    from modtag.preflight import check_models_reachable
    from modtag.servers import free_port
    from modtag.stack import Stack

    check_models_reachable(settings.models)
    print(f"starting a local modtag stack (models: {settings.models})...", file=sys.stderr)
    with (
        Stack(settings, port=free_port(), workers=args.workers, temporary_key=True) as stack,
        ApiClient(stack.api_url, key=stack.admin_key, timeout_s=timeout_s) as client,
    ):
        yield client


def _print_report(as_json: bool, json_text: Callable[[], str], table: Callable[[TextIO], None]) -> None:
    """A command's result: JSON with `--json`, else the table a person reads."""
    if as_json:
        print(json_text())
    else:
        table(sys.stdout)


def _install_stop_signals() -> Any:
    import threading

    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _bounded(
    convert: Callable[[str], Number], what: str, within: Callable[[Number], bool], refusal: str
) -> Callable[[str], Number]:
    """An argparse `type`: `convert` the text (refused as not `what`), then refuse a value outside `within`.

    `refusal` is formatted with the `value` and the `text` as typed."""

    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not within(value):
            raise argparse.ArgumentTypeError(refusal.format(value=value, text=text))
        return value

    return parse


_positive_int = _bounded(int, "a whole number", lambda value: 1 <= value <= 256, "{value} is out of range (1 to 256)")
_positive_float = _bounded(float, "a number", lambda value: value > 0, "{text} must be above 0")
_wait_seconds = _bounded(int, "a whole number of seconds", lambda value: 0 <= value <= 3600, "{value} is not 0 to 3600")
_port = _bounded(int, "a port number", lambda value: 0 <= value <= 65535, "{value} is not a port (0 to 65535)")
_video_seconds = _bounded(
    int, "a whole number of seconds", lambda value: 1 <= value <= 600, "{value} is out of range (1 to 600)"
)
_bank_size = _bounded(
    lambda text: int(float(text)),  # 1e6 reads as one million
    "a number of hashes",
    lambda value: 1 <= value <= MAX_BENCH_BANK,
    f"{{value}} is out of range (1 to {MAX_BENCH_BANK:,})",
)
