"""`aimesh tenants ...`: tenant administration against a running mesh, through its front
door (gRPC, the SDK's `client.tenants`), with an admin token.

    aimesh tenants create acme --plan free --budget 50 --capabilities text,embedding
    aimesh tenants list
    aimesh tenants show acme
    aimesh tenants update acme --plan default --disable
    aimesh tenants set-limit acme --capability text --kind units --limit 100000 --window 1h
    aimesh tenants token acme --expires 30d --scope text,embedding     (prints the token)
    aimesh tenants revoke TOKEN_ID
    aimesh tenants rotate-key [--retire-old]

The admin token comes from --token, else $AIMESH_TOKEN, else <state-dir>/admin.token
(written by `aimesh up`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aimesh.client.tenancy import TenantsClient
    from aimesh.tenancy.v1 import tenancy_pb2 as pb

TOKEN_ENV = "AIMESH_TOKEN"
TOKEN_FILE = "admin.token"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'45s', '15m', '12h', '30d', '2w' or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number with s, m, h, d or w (e.g. 30d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def admin_token(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str:
    """--token, else $AIMESH_TOKEN, else <state-dir>/admin.token; SystemExit if none."""
    environ = os.environ if environ is None else environ
    if args.token:
        return args.token
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    path = Path(args.state_dir) / TOKEN_FILE
    if path.is_file():
        return path.read_text().strip()
    raise SystemExit(f"error: no admin token: pass --token, set {TOKEN_ENV}, or run `aimesh up` "
                     f"(it writes {path})")


def _window(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _limit_line(limit: pb.Limit) -> str:
    from aimesh.tenancy.v1 import tenancy_pb2 as pb

    kind = pb.LimitKind.Name(limit.kind).removeprefix("LIMIT_KIND_").lower()
    model = f" model {limit.model}" if limit.model else ""
    return f"{limit.capability:<10} {kind:<8} {limit.limit:>12g} per {_window(limit.window.seconds)}{model}"


def _tenant_lines(tenant: pb.Tenant) -> list[str]:
    overridden = {(o.capability, o.model, o.kind) for o in tenant.overrides}
    budget = f"${tenant.monthly_budget_usd:g}/month" if tenant.monthly_budget_usd else "none"
    lines = [
        f"tenant:       {tenant.id} ({tenant.display_name})",
        f"plan:         {tenant.plan}",
        f"budget:       {budget}",
        f"capabilities: {', '.join(tenant.allowed_capabilities) or 'all'}",
        f"models:       {', '.join(tenant.allowed_models) or 'all'}",
        f"disabled:     {'yes' if tenant.disabled else 'no'}",
        f"created:      {tenant.create_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC",
        "limits:" if tenant.limits else "limits:       none",
    ]
    for limit in tenant.limits:
        mark = "  (override)" if (limit.capability, limit.model, limit.kind) in overridden else ""
        lines.append(f"  {_limit_line(limit)}{mark}")
    return lines


def _token_line(info: pb.TokenInfo) -> str:
    state = "revoked" if info.revoked else f"expires {info.expire_time.ToDatetime():%Y-%m-%d %H:%M} UTC"
    return f"{info.id}  {' '.join(info.scopes):<30} key {info.key_id}  {state}"


def _create(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    tenant = client.create(args.tenant_id, display_name=args.name or "", plan=args.plan or "",
                           monthly_budget_usd=args.budget, allowed_capabilities=args.capabilities,
                           allowed_models=args.models)
    return _tenant_lines(tenant)


def _list(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    lines = [f"{'TENANT':<24} {'PLAN':<10} {'BUDGET':>10}  {'CAPABILITIES':<24} DISABLED"]
    for t in client.list():
        budget = f"${t.monthly_budget_usd:g}" if t.monthly_budget_usd else "-"
        lines.append(f"{t.id:<24} {t.plan:<10} {budget:>10}  "
                     f"{','.join(t.allowed_capabilities) or 'all':<24} {'yes' if t.disabled else ''}")
    return lines


def _show(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    lines = _tenant_lines(client.get(args.tenant_id))
    tokens = client.list_tokens(args.tenant_id)
    lines.append("tokens:" if tokens else "tokens:       none")
    lines += [f"  {_token_line(info)}" for info in tokens]
    return lines


def _update(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    tenant = client.update(args.tenant_id, plan=args.plan, monthly_budget_usd=args.budget,
                           allowed_capabilities=args.capabilities, allowed_models=args.models,
                           disabled=args.disabled)
    return _tenant_lines(tenant)


def _set_limit(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    if args.clear:
        tenant = client.clear_limit(args.tenant_id, args.capability, args.kind, model=args.model)
    else:
        if args.limit is None:
            raise SystemExit("error: --limit is required (or --clear)")
        tenant = client.set_limit(args.tenant_id, args.capability, args.kind, args.limit,
                                  args.window, model=args.model)
    return _tenant_lines(tenant)


def _token(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    issued = client.issue_token(args.tenant_id, args.scope, ttl=args.expires)
    print(f"# {_token_line(issued.info)}", file=sys.stderr)
    return [issued.token]  # alone on stdout: TOKEN=$(aimesh tenants token acme)


def _revoke(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    return [_token_line(client.revoke_token(args.token_id))]


def _rotate(client: TenantsClient, args: argparse.Namespace) -> list[str]:
    rotated = client.rotate_signing_key(retire_old=args.retire_old)
    return [f"new signing key: {rotated.key_id}",
            f"active keys:     {', '.join(rotated.active_key_ids)}"]


def _run(action: Callable[[TenantsClient, argparse.Namespace], list[str]]
         ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import aimesh

        token = admin_token(args)
        try:
            with aimesh.Client(args.target, token=token, timeout=args.timeout) as client:
                lines = action(client.tenants, args)
        except aimesh.AimeshError as err:
            print(f"error: {err}", file=sys.stderr)
            for field, why in err.field_violations.items():
                print(f"  {field}: {why}", file=sys.stderr)
            if err.code.name == "UNAVAILABLE":
                print(f"  is the mesh up at {args.target}? (aimesh up)", file=sys.stderr)
            return 1
        print("\n".join(lines))
        return 0

    return run


def add_tenants_parser(sub: Any) -> None:
    """Registers `aimesh tenants ...` on the main CLI's subparsers."""
    tenants = sub.add_parser("tenants", help="manage tenants and tokens of a running mesh")
    actions = tenants.add_subparsers(dest="action", required=True)
    # Options every action takes (after the action: `aimesh tenants list --token ...`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="localhost:8080",
                        help="the mesh front door (default localhost:8080)")
    common.add_argument("--token", help=f"admin token (default: ${TOKEN_ENV}, "
                                        f"else <state-dir>/{TOKEN_FILE})")
    common.add_argument("--state-dir", default=".aimesh", help="where `aimesh up` keeps its state")
    common.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help_text, parents=[common])

    def tenant_fields(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--plan", help="plan: default, free, unlimited")
        parser.add_argument("--budget", type=float, help="monthly budget in USD (0: none)")
        parser.add_argument("--capabilities", type=_csv, metavar="LIST",
                            help="comma list of allowed capabilities (text,image,stt,tts,vision,"
                                 "embedding)")
        parser.add_argument("--models", type=_csv, metavar="LIST", help="comma list of allowed models")

    create = action("create", "create a tenant")
    create.add_argument("tenant_id")
    create.add_argument("--name", help="display name")
    tenant_fields(create)
    create.set_defaults(func=_run(_create), capabilities=[], models=[])

    action("list", "list tenants").set_defaults(func=_run(_list))

    show = action("show", "a tenant, its limits in force and its tokens")
    show.add_argument("tenant_id")
    show.set_defaults(func=_run(_show))

    update = action("update", "change a tenant's plan, budget, allowed lists")
    update.add_argument("tenant_id")
    tenant_fields(update)
    state = update.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True)
    state.add_argument("--enable", dest="disabled", action="store_const", const=False)
    update.set_defaults(func=_run(_update))

    limit = action("set-limit", "override one limit (or --clear it)")
    limit.add_argument("tenant_id")
    limit.add_argument("--capability", required=True, help="text, image, stt, tts, vision, "
                                                           "embedding, or '*' for all")
    limit.add_argument("--kind", required=True, choices=["requests", "units"])
    limit.add_argument("--limit", type=float, help="most calls or units per window")
    limit.add_argument("--window", type=lambda t: parse_duration(t).total_seconds(), default=60,
                       help="window length, e.g. 1m, 1h, 1d (default 1m)")
    limit.add_argument("--model", default="", help="only this model (default: every model)")
    limit.add_argument("--clear", action="store_true", help="remove the override")
    limit.set_defaults(func=_run(_set_limit))

    token = action("token", "issue a token (printed alone on stdout)")
    token.add_argument("tenant_id")
    token.add_argument("--scope", type=_csv, default=[],
                       help="comma list: capabilities and/or admin (default: every capability)")
    token.add_argument("--expires", type=parse_duration, default=timedelta(days=30),
                       help="lifetime, e.g. 1h, 30d (default 30d)")
    token.set_defaults(func=_run(_token))

    revoke = action("revoke", "revoke a token by id (jti)")
    revoke.add_argument("token_id")
    revoke.set_defaults(func=_run(_revoke))

    rotate = action("rotate-key", "sign new tokens with a new key")
    rotate.add_argument("--retire-old", action="store_true",
                        help="retire keys older than the previous one (their tokens stop working)")
    rotate.set_defaults(func=_run(_rotate))
