"""``cxr-worker``: the command line an admin uses (serve, status, requeue, check-config, echo, db,
train...)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import yaml

from db.engine import safe_url
from db.errors import DatabaseNotReady, QueueUnavailable
from db.queue import Queue
from models.training import cli as training

from . import __version__
from .config import AppConfig, ConfigError, load_config
from .logging_setup import configure

log = logging.getLogger("worker.cli")


def _add_config(p: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``--config`` is accepted before and after the subcommand. Only the top-level parser has a
    default: a subparser's ``SUPPRESS`` leaves the top-level value alone unless ``--config``
    follows the subcommand, and then that later value wins."""
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None if top_level else argparse.SUPPRESS,
        help="config file (default: $CXR_CONFIG or ./config.yaml)",
    )


def _load(args: argparse.Namespace) -> AppConfig:
    cfg = load_config(args.config)
    configure(cfg.logging.level)
    return cfg


def _open_queue(cfg: AppConfig) -> Queue:
    """The queue for an admin command: a missing or out-of-date schema is refused, never created."""
    return Queue.from_config(
        cfg.queue,
        upgrade_empty=False,
        delivery_max_attempts=cfg.scheduler.delivery_max_attempts,
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.path or args.config)
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

    url = cfg.queue.database_url
    migrate.upgrade(url)  # creates an SQLite file's folder (db.engine.make_engine)
    print(f"database {safe_url(url)} is at revision {migrate.current_revision(url)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    queue = _open_queue(cfg)
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
            f"  {s.study_uid:<64} {s.state:<10} {s.instance_count:>4}  {deliveries:<24} "
            f"{s.reason or ''}"
        )
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    cfg = _load(args)
    queue = _open_queue(cfg)
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
    queue = _open_queue(cfg)
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
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
    print(f"C-ECHO {where}: {'OK' if ok else 'FAILED'} {detail}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-worker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cxr-pacs-worker {__version__}")
    _add_config(parser, top_level=True)
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
    _add_config(p)
    dsub = p.add_subparsers(dest="db_command", required=True)
    d = dsub.add_parser("upgrade", help="create or migrate the schema to the latest revision")
    _add_config(d)
    d.set_defaults(func=cmd_db)

    # train/evaluate: the models package's own subcommands (torch is imported when one runs)
    training.add_subcommands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
    except (DatabaseNotReady, QueueUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI's last resort: say what failed, not a traceback
        # models.registry imports torch: look the class up only once something has gone wrong
        from models.registry import ModelLoadError

        if not isinstance(exc, ModelLoadError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
