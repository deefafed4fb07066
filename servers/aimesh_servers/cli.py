"""`aimesh`: the single entry point.

    aimesh up                 the whole local mesh: Envoy + control + model servers
    aimesh serve CAPABILITY   one model server (text, ...)
    aimesh tenants ...        tenants and tokens of a running mesh
    aimesh worker             job items from the Redis queue (aimesh up --redis starts these)
    aimesh status             models, pools, endpoints and the last minute's calls
    aimesh certs init|rotate  the mesh CA and certificates for mutual TLS
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import replace

from .capabilities import CAPABILITIES
from .jobs.process import add_worker_parser
from .mesh.certs import add_certs_parser
from .tenancy.cli import add_tenants_parser


def _serve(args: argparse.Namespace) -> int:
    from .runtime import logs
    from .runtime.runner import ModelServer
    from .runtime.settings import ServerSettings

    logs.configure("DEBUG" if args.verbose else "INFO")

    info = CAPABILITIES[args.capability]
    module = info.load()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("pool", args.pool)) if v is not None}
    settings = ServerSettings(**overrides)
    model = module.DEFAULT_MODEL
    if args.model:
        model = replace(model, id=args.model)
    if args.source:
        from .models.builtin import has_random_weights

        model = replace(model, source=args.source, random_weights=has_random_weights(args.source))
    if args.version:
        model = replace(model, version=args.version)
    server = ModelServer(settings, [module.build(model, settings)])
    return asyncio.run(server.run_until_signal())


def _up(args: argparse.Namespace) -> int:
    from .mesh.up import run_up

    return run_up(args)


def _status(args: argparse.Namespace) -> int:
    from .mesh.status import run_status

    return run_status(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aimesh", description="A gRPC service mesh for AI models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one model server")
    serve.add_argument("capability", choices=sorted(CAPABILITIES))
    serve.add_argument("--model", help="logical model id it answers for (default: the offline default)")
    serve.add_argument("--source", help="Hugging Face id, local path or builtin:NAME of the weights")
    serve.add_argument("--version", help="model version it reports")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 0: a free one, printed)")
    serve.add_argument("--pool", help="pool name reported in responses (default local)")
    serve.set_defaults(func=_serve)

    up = sub.add_parser("up", help="run the local mesh: Envoy + control + model servers")
    up.add_argument("--registry", help="model registry file (default: the built-in one)")
    up.add_argument("--port", type=int, default=8080, help="Envoy front door port (default 8080)")
    up.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port, localhost only")
    up.add_argument("--only", action="append", help="start only these capabilities (repeatable)")
    up.add_argument("--state-dir", default=".aimesh", help="where generated config and logs go")
    up.add_argument("--listen", default="127.0.0.1", help="front door bind address (default 127.0.0.1)")
    up.add_argument("--consul", metavar="ADDR",
                    help="discover model servers through the Consul agent at ADDR (host:port); "
                         "servers it starts register there")
    up.add_argument("--no-tenancy", action="store_true",
                    help="no tokens, no limits (usage is still recorded): local experiments only")
    up.add_argument("--database", default=os.environ.get("AIMESH_DATABASE_URL"),
                    help="tenants and usage: a PostgreSQL URL (default: SQLite in the state dir; "
                         "env AIMESH_DATABASE_URL)")
    up.add_argument("--redis", default=os.environ.get("AIMESH_REDIS_URL"),
                    help="shared limit counters, e.g. redis://host:6379/0 (default: in memory; "
                         "env AIMESH_REDIS_URL)")
    up.add_argument("--job-workers", type=int, default=1,
                    help="with --redis: `aimesh worker` processes running job items (default 1); "
                         "without Redis, jobs run inside aimesh up")
    up.add_argument("--front-doors", type=int, default=int(os.environ.get("AIMESH_FRONT_DOORS", "1")),
                    help="front doors (Envoy instances) sharing the limits: each admits its share "
                         "of a requests-per-window limit (default 1)")
    up.add_argument("--otlp", metavar="HOST:PORT",
                    help="trace calls: Envoy and every server export spans to this OTLP/gRPC collector")
    up.add_argument("--trace-sample-ratio", type=float, default=1.0,
                    help="share of new traces sampled, 0..1 (default 1; a caller's sampled traceparent wins)")
    up.add_argument("--trust-issuer", metavar="FILE",
                    help="YAML list of external identity providers whose tokens are accepted")
    up.add_argument("--mtls", action="store_true",
                    help="mutual TLS between Envoy, the model servers and the control server "
                         "(certificates from --certs-dir, made there if missing)")
    up.add_argument("--certs-dir", help="the mesh certificates (aimesh certs; default STATE_DIR/certs)")
    up.add_argument("--tls-cert", metavar="FILE", help="the front door serves TLS with this certificate (PEM)")
    up.add_argument("--tls-key", metavar="FILE", help="the front door certificate's key (PEM)")
    up.add_argument("--ops-port", type=int, default=9902,
                    help="operator page on 127.0.0.1 (default 9902; a free port if taken; 0: a free one)")
    up.add_argument("--stats-window-s", type=float, default=300.0,
                    help="the window of the registry API's live figures per model and pool (default 300)")
    up.set_defaults(func=_up)

    add_tenants_parser(sub)
    add_certs_parser(sub)
    add_worker_parser(sub)

    status = sub.add_parser("status", help="models, pools and endpoints of a running mesh, with the "
                                           "last minute's calls/s, errors, p95 and fallbacks")
    status.add_argument("--front", default="127.0.0.1:8080", help="the front door (default 127.0.0.1:8080)")
    status.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    status.add_argument("--state-dir", default=".aimesh", help="the state dir of `aimesh up`")
    status.add_argument("--json", action="store_true", help="one JSON object (per refresh)")
    status.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    status.set_defaults(func=_status)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
