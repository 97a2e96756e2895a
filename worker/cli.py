"""``cxr-worker``: the command line an admin uses (serve, status, requeue, check-config, echo, db,
train...)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import yaml
from pydicom.uid import UID

from db.engine import safe_url
from db.errors import DatabaseNotReady, QueueUnavailable
from db.queue import Queue
from db.records import EventRow, StudyDetail, StudySummary
from db.sanitise import escape_control
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
    configure(cfg.logging.level, cfg.logging.format)
    return cfg


def _open_queue(cfg: AppConfig) -> Queue:
    """The queue for an admin command: a missing or out-of-date schema is refused, never created."""
    return Queue.from_config(
        cfg.queue,
        upgrade_empty=False,
        delivery_max_attempts=cfg.scheduler.delivery_max_attempts,
    )


def cmd_check_config(args: argparse.Namespace) -> int:
    source = args.path or args.config or "config.yaml"
    cfg = load_config(args.path or args.config)
    data = json.loads(cfg.model_dump_json())
    data["queue"]["database_url"] = safe_url(cfg.queue.database_url)
    problems = address_problems(cfg)
    if problems:
        print(f"configuration error:\n{source}: " + f"\n{source}: ".join(problems), file=sys.stderr)
        return 2
    print(f"# effective configuration ({source}): OK")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def address_problems(cfg: AppConfig) -> list[str]:
    """The listening addresses this machine cannot bind (not one of its addresses, cannot be
    resolved), each as ``key: why``; checked by binding port 0, so a busy port is not a problem
    here (``serve`` says so when it is)."""
    wanted = [("dicom.bind_host", cfg.dicom.bind_host)]
    if cfg.health.enabled:
        wanted.append(("health.host", cfg.health.host))
    problems = []
    for key, host in wanted:
        try:
            family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
        except OSError as exc:
            why = (
                "it is not an address of this machine"
                if exc.errno == errno.EADDRNOTAVAIL
                else (exc.strerror or str(exc))
            )
            problems.append(f"{key}: cannot listen on {host!r}: {why}")
    return problems


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dicom_node.scp import ListenError

    from .service import Service

    try:
        Service(cfg, role=args.role).serve_forever()
    except ListenError as exc:
        log.error("%s", exc.strerror or exc)
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1
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
    now = datetime.now(UTC)
    for s in latest:
        deliveries = ", ".join(f"{k}:{v}" for k, v in s.deliveries.items()) or "-"
        print(
            f"  {s.study_uid:<64} {s.state:<10} {s.instance_count:>4}  {deliveries:<24} "
            f"{escape_control(s.reason or '')}"
        )
        for line in status_details(s, max_attempts=cfg.queue.max_attempts, now=now):
            print(f"      {line}")
    return 0


def status_details(s: StudySummary, *, max_attempts: int, now: datetime) -> list[str]:
    """The lines under a study in ``status``: attempts, last error, next retry, and each
    destination's delivery state (all sanitised: no control characters)."""
    lines = []
    if s.attempts or s.last_error:
        text = f"attempts: {s.attempts} of {max_attempts}"
        if s.last_error and s.state != "done":
            when = _when(s.last_error_at)
            text += f"; last error ({when}): {escape_control(s.last_error)}"
        lines.append(text)
    if s.state == "ready" and s.ready_at is not None and s.ready_at > now:
        wait = (s.ready_at - now).total_seconds()
        lines.append(f"next retry: {_when(s.ready_at)} (in {wait:.0f} s)")
    for d in s.destinations:
        states = ", ".join(f"{k} {v}" for k, v in sorted(d.states.items()))
        text = f"to {d.destination}: {states}; {d.attempts} attempt(s)"
        if d.next_attempt_at is not None:
            text += f"; next retry {_when(d.next_attempt_at)}"
        if d.last_status:
            text += f"; last: {escape_control(d.last_status)}"
        lines.append(text)
    return lines


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def cmd_history(args: argparse.Namespace) -> int:
    cfg = _load(args)
    queue = _open_queue(cfg)
    detail = queue.study(args.study_uid)
    trail = queue.history(args.study_uid)
    if detail is None or trail is None:
        print(
            f"history: study {args.study_uid} is not in the queue (never received, or purged)",
            file=sys.stderr,
        )
        return 1
    rows = history_rows(detail, trail)
    if args.json:
        print(json.dumps([r._asdict() for r in rows], default=str, indent=2))
        return 0
    print(
        f"study {detail.study_uid}: {detail.state}, {len(detail.instances)} instance(s), "
        f"{len(detail.results)} result(s), {len(detail.deliveries)} delivery(ies)"
    )
    print(f"{'time (UTC)':<23}  {'what':<42} {'by':<16} detail")
    for r in rows:
        print(
            f"{r.at.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')[:23]:<23}  "
            f"{r.what:<42} {r.by:<16} {r.detail}"
        )
    return 0


class HistoryRow(NamedTuple):
    at: datetime
    what: str  # "receiving -> ready", "instance received", "delivery 3 to pacs: pending -> ..."
    by: str  # the actor: scp, scheduler, a worker name, cli; or the calling AE of an instance
    detail: str


def history_rows(detail: StudyDetail, trail: list[EventRow]) -> list[HistoryRow]:
    """The study's events, its deliveries' events and its instances' arrival, in time order (at
    one instant: the creation first, then instances, then what they caused). No patient data:
    UIDs, SOP classes, header view names, AE titles and the queue's own reasons only."""
    dest = {d.id: d.destination for d in detail.deliveries}
    keyed: list[tuple[datetime, int, int, HistoryRow]] = []
    for n, e in enumerate(trail):
        if e.delivery_id is not None:
            what = f"delivery {e.delivery_id} to {dest.get(e.delivery_id, '?')}: "
        else:
            what = ""
        what += f"{e.from_state} -> {e.to_state}" if e.from_state else f"created, {e.to_state}"
        # at one instant: a study's creation, then instances, its own changes, its deliveries'
        rank = 2 if e.delivery_id is not None else (-1 if e.from_state is None else 1)
        row = HistoryRow(e.at, what, escape_control(e.actor), escape_control(e.reason or ""))
        keyed.append((e.at, rank, n, row))
    for n, i in enumerate(detail.instances):
        kind = UID(i.sop_class_uid).name if i.sop_class_uid else "?"
        view = f" {i.view}" + (f" ({i.view_position})" if i.view_position else "") if i.view else ""
        fate = "analysed" if i.eligible else f"stored only: {i.ineligible_reason or 'not eligible'}"
        text = f"{i.modality or '?'}{view} {kind}, {i.sop_instance_uid} [{fate}]"
        row = HistoryRow(
            i.received_at,
            "instance received",
            escape_control(i.calling_ae or "?"),
            escape_control(text),
        )
        keyed.append((i.received_at, 0, n, row))
    return [r for *_, r in sorted(keyed, key=lambda k: (k[0], k[1], k[2]))]


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

    p = sub.add_parser("history", help="a study's audit trail: instances, states, deliveries")
    _add_config(p)
    p.add_argument("study_uid")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_history)

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
