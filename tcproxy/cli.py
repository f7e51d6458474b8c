"""The ``tcproxy`` command: argparse → config → logging → run. No request logic here.

Exit codes: 0 success; 1 the service could not start or failed; 2 bad usage or a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
from collections.abc import Sequence

import structlog

from tcproxy import __version__
from tcproxy.config import (
    Config,
    ConfigInvalid,
    ConfigProblem,
    TokenError,
    load_config,
    parse_listen,
    resolve_token,
)
from tcproxy.config.model import DOCUMENTED_RPM, LedgerConfig, exposure_problem
from tcproxy.config.token import Secret
from tcproxy.emulator import MODES, EmulatorSettings
from tcproxy.log import configure_logging

EXAMPLES = """\
examples:
  tcproxy serve --emulator                  try it offline: a proxy on 127.0.0.1:8787 in front
                                            of a built-in TokenCheap emulator, no key needed
  TOKENCHEAP_API_KEY=... tcproxy serve      the real upstream, default settings
  tcproxy serve --config /etc/tcproxy/config.yaml
  tcproxy check-config config.yaml          list every problem in a config, or say it is fine
  tcproxy emulate --port 9000               the emulator alone, for testing your own tools
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcproxy",
        description="A local gateway for the TokenCheap API: tools talk to it on localhost, it"
        " holds the real key, paces requests so the upstream never answers 429, and logs"
        " every request.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tcproxy {__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy until SIGTERM or Ctrl-C. Without --config, the defaults"
        " apply: listen on 127.0.0.1:8787, upstream https://api.tokencheap.com, token from"
        " TOKENCHEAP_API_KEY, the documented per-model limits.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML config (see config.example.yaml)")
    serve.add_argument(
        "--emulator",
        action="store_true",
        help="answer from a built-in TokenCheap emulator instead of the real upstream:"
        " works offline, needs no key, spends nothing",
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen address")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("auto", "json", "console"))
    serve.set_defaults(run=_serve)

    emulate = commands.add_parser(
        "emulate",
        help="run the TokenCheap emulator alone",
        description="Run a TokenCheap emulator: completions with usage, SSE streaming, 401 on a"
        " wrong token, 402 when a balance is spent, 429 past a model's rpm, and faults on"
        " request (header X-Emulator-Fault, e.g. 'status=503', 'hang', 'reset-mid-stream=3').",
    )
    emulate.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    emulate.add_argument("--port", type=int, default=8788, help="port (default: %(default)s)")
    emulate.add_argument("--token", help="the only token accepted (default: any non-empty one)")
    emulate.add_argument(
        "--enforce",
        choices=MODES,
        default="sliding",
        help="how a minute is counted: fixed window, sliding 60 s window, or per-second bucket"
        " (default: %(default)s)",
    )
    emulate.add_argument(
        "--rpm",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="a model's requests per minute (repeatable; default: the documented limits)",
    )
    emulate.add_argument(
        "--time-scale", type=float, default=1.0, help="emulated seconds per real second"
    )
    emulate.add_argument(
        "--balance", type=int, help="tokens before answering 402 (default: unlimited)"
    )
    emulate.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    emulate.add_argument(
        "--stream-delay", type=float, default=0.0, help="seconds between SSE events"
    )
    emulate.add_argument("--fault", help="a fault for every request, e.g. 'status=503'")
    emulate.add_argument(
        "--fault-rate", type=float, default=1.0, help="share of requests given --fault"
    )
    emulate.set_defaults(run=_emulate)

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Print every problem in a config file with its key path and line, and exit"
        " 2; or say it is fine and exit 0.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=_check_config)

    keys = commands.add_parser(
        "keys",
        help="make client keys for a team",
        description="Client keys let several people share one tcproxy (and one TokenCheap key)"
        " without sharing that key: each gets a key of their own, which can be revoked alone.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    new_key = key_commands.add_parser(
        "new",
        help="print a fresh client key and the config lines to add",
        description="Print a fresh client key once, and the lines to add under 'clients:' in"
        " the config (which stores only the key's SHA-256). Give the key to its owner; then"
        " reload tcproxy (systemctl reload tcproxy). To revoke it, delete those lines and reload.",
    )
    new_key.add_argument("name", metavar="NAME", help="who the key is for, e.g. alice")
    new_key.set_defaults(run=_new_key)

    usage = commands.add_parser(
        "usage",
        help="report who used what, from the usage ledger",
        description="Sum the requests and tokens in the usage ledger by client and/or model."
        " Periods are UTC.",
    )
    where = usage.add_mutually_exclusive_group()
    where.add_argument(
        "--db", metavar="FILE", help="the ledger file (e.g. /var/lib/tcproxy/usage.db)"
    )
    where.add_argument(
        "--config", metavar="FILE", help="find the ledger from this config's ledger.path"
    )
    usage.add_argument(
        "--period",
        help="today, yesterday, month (the default), last-month, all, or Nd (e.g. 7d)",
    )
    usage.add_argument("--since", metavar="DATE", help="from this date (UTC), e.g. 2026-11-01")
    usage.add_argument("--until", metavar="DATE", help="up to this date (UTC), not included")
    usage.add_argument("--by", choices=("client", "model", "client,model"), default="client,model")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_const", const="json", dest="format")
    output.add_argument("--csv", action="store_const", const="csv", dest="format")
    usage.set_defaults(run=_usage, format="table")
    return parser


def _load(path: str | None, listen: str | None = None) -> Config:
    config = load_config(path) if path else Config()
    if listen:
        config = dataclasses.replace(config, listen=parse_listen(listen))
        problem = exposure_problem(config)
        if problem:
            raise ConfigInvalid("--listen", [ConfigProblem("", problem)])
    return config


def _serve(args: argparse.Namespace) -> int:
    from tcproxy.service import Service, Source, StartupError, emulator_token, register_secrets

    def read_config() -> Config:
        config = _load(args.config, args.listen)
        # Flags win over the file, on start and on every reload.
        log = dataclasses.replace(
            config.log,
            level=args.log_level or config.log.level,
            format=args.log_format or config.log.format,
        )
        config = dataclasses.replace(config, log=log)
        if args.emulator and config.ledger.path is None:
            # Emulated traffic stays out of the default ledger, where real usage is counted.
            config = dataclasses.replace(config, ledger=LedgerConfig(enabled=False))
        return config

    emulator = None
    source = Source(read_config)
    if args.emulator:
        source.token = Secret(emulator_token())
        emulator = EmulatorSettings(token=source.token.reveal())
    try:
        config, token, warnings = source.read()
    except ConfigInvalid as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except TokenError as exc:
        print(f"tcproxy: {exc}", file=sys.stderr)
        return 2
    log_control = configure_logging(config.log.level, config.log.format)
    register_secrets(log_control, config, token)
    log = structlog.get_logger("tcproxy")
    for warning in warnings:
        log.warning(warning)
    service = Service(source, log_control, emulator=emulator)
    try:
        asyncio.run(service.run(config, token))
    except StartupError as exc:
        log.error(str(exc))
        log_control.close()
        print(f"tcproxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    log_control.close()
    return 0


def _emulate(args: argparse.Namespace) -> int:
    from tcproxy.service import StartupError, start_emulator, until_stopped

    rpm = dict(DOCUMENTED_RPM)
    for item in args.rpm:
        model, _, value = item.partition("=")
        if not model or not value.isdigit() or int(value) < 1:
            print(
                f"tcproxy emulate: --rpm takes MODEL=N with N >= 1, got {item!r}", file=sys.stderr
            )
            return 2
        rpm[model] = int(value)
    if args.time_scale <= 0:
        print("tcproxy emulate: --time-scale must be above 0", file=sys.stderr)
        return 2
    settings = EmulatorSettings(
        token=args.token,
        rpm=rpm,
        enforce=args.enforce,
        time_scale=args.time_scale,
        balance=args.balance,
        latency=args.latency,
        stream_delay=args.stream_delay,
        fault=args.fault,
        fault_rate=args.fault_rate,
    )
    configure_logging("info", "auto")
    log = structlog.get_logger("tcproxy.emulator")

    async def run() -> None:
        listening = await start_emulator(settings, args.host, args.port)
        log.info(
            "TokenCheap emulator listening",
            url=listening.url,
            enforce=settings.enforce,
            rpm=rpm,
            time_scale=settings.time_scale,
        )
        try:
            await until_stopped()
        finally:
            await listening.close()

    try:
        asyncio.run(run())
    except StartupError as exc:
        print(f"tcproxy emulate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigInvalid as exc:
        print(exc.render(), file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.file}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 2
    limits = config.limits
    models = ", ".join(f"{name} {limit.rpm} rpm" for name, limit in limits.models.items())
    print(f"{args.file}: OK")
    print(f"  listen    {config.listen}")
    print(f"  upstream  {config.upstream.base_url}")
    print(f"  limits    {models or '(none listed)'}; other models {limits.default.rpm} rpm")
    try:
        resolved = resolve_token(config.upstream)
        print(f"  token     found ({resolved.source})")
        for warning in resolved.warnings:
            print(f"  warning   {warning}")
    except TokenError as exc:
        # Not an error of the file: the service may run with another environment.
        print(f"  note      in this environment: {exc}")
    return 0


def _new_key(args: argparse.Namespace) -> int:
    from tcproxy.clients import new_key

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.name):
        print("tcproxy keys new: NAME is 1-64 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 2
    key, digest = new_key()
    print(f"client key for {args.name} (shown only now; give it to {args.name}):\n")
    print(f"  {key}\n")
    print("add to the config, under 'clients:', then reload tcproxy:\n")
    print("clients:")
    print(f"  {args.name}:")
    print(f"    key_sha256: {digest}")
    print("    # rpm: 60                 # optional: cap this client's requests per minute")
    print("    # tokens_per_day: 200000  # optional: token budgets (UTC day and month)")
    print("    # tokens_per_month: 3000000")
    return 0


def _usage(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tcproxy.config.paths import ledger_path
    from tcproxy.report import ReportError, period, render, summarise

    if args.db:
        path = Path(args.db)
    else:
        try:
            config = load_config(args.config) if args.config else Config()
        except ConfigInvalid as exc:
            print(exc.render(), file=sys.stderr)
            return 2
        found = ledger_path(config.ledger)
        if found is None:
            print(
                "tcproxy usage: the ledger is off in this config (ledger.enabled)", file=sys.stderr
            )
            return 2
        path = found
    try:
        span = period(args.period, args.since, args.until)
        report = summarise(path, span, args.by)
    except ReportError as exc:
        print(f"tcproxy usage: {exc}", file=sys.stderr)
        return 2
    print(render(report, args.by, span, args.format))
    return 0
