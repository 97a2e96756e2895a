"""``cxr-worker``: the command line an admin uses (serve, status, requeue, check-config, echo, db, train...)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import yaml

from . import __version__
from .config import AppConfig, ConfigError, load_config
from .logging_setup import configure

log = logging.getLogger("worker.cli")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="config file (default: $CXR_CONFIG or ./config.yaml)",
    )


def _load(args: argparse.Namespace) -> AppConfig:
    cfg = load_config(args.config)
    configure(cfg.logging.level)
    return cfg


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.path or args.config)
    from .config import safe_url

    data = json.loads(cfg.model_dump_json())
    data["queue"]["database_url"] = safe_url(cfg.queue.database_url)
    print(f"# effective configuration ({args.path or args.config or 'config.yaml'}): OK")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .service import Service

    Service(cfg, role=args.role).serve_forever()
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from db import migrate

    from .config import safe_url

    url = cfg.queue.database_url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(url)
    print(f"database {safe_url(url)} is at revision {migrate.current_revision(url)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .service import open_queue

    queue = open_queue(cfg, upgrade_empty=False)
    counts = queue.counts()
    latest = queue.latest(args.limit)
    if args.json:
        print(
            json.dumps(
                {"counts": counts, "latest": [asdict(s) for s in latest]}, default=str, indent=2
            )
        )
        return 0
    print("studies by state:")
    for state, n in counts.items():
        print(f"  {state:<11} {n}")
    print(f"\nlatest {len(latest)} (most recently updated first):")
    print(f"  {'study instance uid':<64} {'state':<10} {'inst':>4}  {'deliveries':<24} reason")
    for s in latest:
        deliveries = ", ".join(f"{k}:{v}" for k, v in s.deliveries.items()) or "-"
        print(
            f"  {s.study_uid:<64} {s.state:<10} {s.instance_count:>4}  {deliveries:<24} {s.reason or ''}"
        )
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .service import open_queue

    queue = open_queue(cfg, upgrade_empty=False)
    if args.failed:
        n = queue.requeue_failed()
        print(f"requeued {n} failed study(ies)")
        return 0
    if not args.study_uid:
        print("requeue: give a STUDY_UID or --failed", file=sys.stderr)
        return 2
    if queue.requeue(args.study_uid):
        print(f"requeued {args.study_uid}")
        return 0
    print(
        f"requeue: study {args.study_uid} not found, or it is still receiving/processing",
        file=sys.stderr,
    )
    return 1


def cmd_resend(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .service import open_queue

    queue = open_queue(cfg, upgrade_empty=False)
    n = queue.resend(args.study_uid)
    if n == 0:
        print(f"resend: no report to resend for study {args.study_uid}", file=sys.stderr)
        return 1
    print(f"{n} delivery(ies) of {args.study_uid} set to pending; the running service sends them")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dicom_node.scu import echo

    dest = cfg.destination(args.destination)
    ok, detail = echo(dest, calling_ae=dest.calling_ae_title or cfg.dicom.ae_title)
    print(
        f"C-ECHO {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {'OK' if ok else 'FAILED'} {detail}"
    )
    return 0 if ok else 1


def _delegate(module: str) -> tuple:
    import importlib

    mod = importlib.import_module(module)
    return mod.add_arguments, mod.run


TRAINERS = {
    "lungmask": "models.train_lungmask",
    "classifier": "models.train_classifier",
    "viewclassifier": "models.train_view",
}
EVALUATORS = {
    "lungmask": "models.eval_lungmask",
    "classifier": "models.evaluate",
    "viewclassifier": "models.evaluate",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cxr-pacs-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the service")
    _add_config(p)
    p.add_argument(
        "--role",
        choices=["all", "scp", "worker"],
        default="all",
        help="all: SCP + scheduler + worker in one process; scp or worker to scale out",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="studies per state and the latest ones")
    _add_config(p)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("requeue", help="send a study (or all failed ones) back to the queue")
    _add_config(p)
    p.add_argument("study_uid", nargs="?")
    p.add_argument("--failed", action="store_true")
    p.set_defaults(func=cmd_requeue)

    p = sub.add_parser("resend", help="deliver a study's latest report again")
    _add_config(p)
    p.add_argument("study_uid")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("check-config", help="validate a config file and print the effective config")
    _add_config(p)
    p.add_argument("path", nargs="?", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("echo", help="C-ECHO a configured result destination")
    _add_config(p)
    p.add_argument("destination", help="the destination's name in config.yaml")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("db", help="database maintenance")
    dsub = p.add_subparsers(dest="db_command", required=True)
    d = dsub.add_parser("upgrade", help="create or migrate the schema to the latest revision")
    _add_config(d)
    d.set_defaults(func=cmd_db)

    # train/evaluate subcommands import torch only when used
    wanted = list(argv) if argv is not None else sys.argv[1:]
    for verb, table in (("train", TRAINERS), ("evaluate", EVALUATORS)):
        p = sub.add_parser(verb, help=f"{verb} a model ({', '.join(table)})")
        msub = p.add_subparsers(dest="model_kind", required=True)
        for kind, module in table.items():
            m = msub.add_parser(kind)
            if len(wanted) >= 2 and wanted[0] == verb and wanted[1] == kind:
                add_arguments, run = _delegate(module)
                add_arguments(m)
                m.set_defaults(func=lambda a, _run=run: _run(a))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the CLI's last resort: say what failed, not a traceback
        name = type(exc).__name__
        if name in ("DatabaseNotReady", "ModelLoadError", "QueueUnavailable"):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
