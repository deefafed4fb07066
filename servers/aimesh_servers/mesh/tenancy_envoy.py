"""Tenancy at the front door: who may call (jwt_authn) and whether now (admission in Lua).

- Identity: Envoy's jwt_authn verifies the caller's JWT and copies its claims into
  headers a caller can never set (header_mutation drops a caller's copies first):
  tenant -> `x-aimesh-tenant`, `scope` -> `x-aimesh-scopes`, `jti` -> `x-aimesh-token-id`.
  Its config comes from a file through ECDS (`write_jwt_config`), so keys rotate and
  trusted providers change without restarting Envoy (applied on the next file poll).
  Verified tokens are cached (expiry is still checked on every hit), which saves the
  signature check on a tenant's repeated calls.
- Admission: one Lua filter after jwt_authn. It copies `{model}` from an HTTP/JSON path
  into the routing header, then reads the matched route's metadata: constants
  (`capability`, `model`, `public`) and the `version` of the admission state the quota
  controller publishes (`write_routes`, RDS from a file) in the virtual host's metadata.
  It refuses revoked tokens, unknown or disabled tenants, calls outside the token's scope
  or the tenant's capabilities and models, blocked tenants (units per window, monthly
  budget) and calls over a requests-per-window limit, counted in Lua (fixed windows;
  Envoy runs one worker, so the counter is exact for this front door). The admission
  table is read and converted once per `version`, so a call costs a few lookups, not a
  conversion of every tenant (Envoy's Lua copies metadata on every read: with 1,000
  tenants in each route's metadata, merely reading it cost ~0.5 ms per call).
- Refusals are AIP-193: gRPC callers get a trailers-only reply with `grpc-status-details-bin`
  (ErrorInfo, QuotaFailure, RetryInfo, protobuf-encoded in Lua); HTTP/JSON callers get the
  HTTP status and a JSON google.rpc.Status built in Lua too (a local reply to an HTTP/JSON
  call does not pass through the transcoder's status conversion). Every refusal sets
  `x-aimesh-reason` for the access log, and `retry-after` when retrying helps. jwt_authn's
  own refusals get the same form from local reply mappers (envoy_config).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aimesh import error_model

from ..runtime.errors import DOMAIN
from ..tenancy.plans import SERVICES

# envoy_config builds the listener from this module's pieces, so the writers below import
# it (and the controller, which imports it) when called, not when this module loads.
if TYPE_CHECKING:
    from .envoy_config import MeshSpec

TENANT_HEADER = "x-aimesh-tenant"
SCOPES_HEADER = "x-aimesh-scopes"
TOKEN_ID_HEADER = "x-aimesh-token-id"
REASON_HEADER = "x-aimesh-reason"
# Set on the request by the admission filter when it refuses a call, so the local reply
# mappers that dress jwt_authn's refusals leave the filter's own refusals alone.
REFUSED_HEADER = "x-aimesh-refused"
# Request headers only Envoy may set; header_mutation drops a caller's copies before
# anything reads them. The transcoder sets x-envoy-original-path for HTTP/JSON calls, and
# the Lua filter routes by it, so a gRPC caller must not bring its own.
INTERNAL_HEADERS = (TENANT_HEADER, SCOPES_HEADER, TOKEN_ID_HEADER, REASON_HEADER, REFUSED_HEADER,
                    "x-envoy-original-path")

MESH_ISSUER = "aimesh"
MESH_AUDIENCE = "aimesh"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_TYPE = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
# Route metadata is read by the Lua filter under its own name.
LUA_FILTER = "envoy.filters.http.lua"

# Reachable without a token (a token, if sent, is still verified and its claims set).
PUBLIC_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.health.v1.Health/",
    "/aimesh.registry.v1.ModelRegistryService/",
    "/healthz",
    "/readyz",
)
TENANT_SERVICE_PREFIX = "/aimesh.tenancy.v1.TenantService/"
USAGE_SERVICE_PREFIX = "/aimesh.usage.v1.UsageService/"
# Servers report calls to the collector on this service; callers never reach it.
INGEST_SERVICE_PREFIX = "/aimesh.usage.v1.UsageIngestService/"

# The scope a token needs for each capability's service (the token's `scope` claim).
SERVICE_CAPABILITY = {service: capability for capability, service in SERVICES.items()}
# Pseudo-capabilities of the control plane's APIs: TenantService needs the admin scope;
# UsageService any valid token (the service itself shows a tenant only its own usage).
ADMIN_CAPABILITY = "admin"
USAGE_CAPABILITY = "usage"

# Admission state before the quota controller publishes one: nothing enforced beyond the
# token (and with tenancy on and no provider yet, jwt_authn refuses every non-public call).
INITIAL_ADMISSION: dict[str, Any] = {"version": 0, "enforce": False, "revoked": [], "tenants": {}}


@dataclass(frozen=True)
class JwtProvider:
    """A token issuer Envoy trusts: the mesh itself, or an external identity provider."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks_json: str  # {"keys": [...]}: public keys only
    tenant_claim: str = "tenant"


def _provider_config(provider: JwtProvider) -> dict[str, Any]:
    return {
        "issuer": provider.issuer,
        "audiences": list(provider.audiences),
        "local_jwks": {"inline_string": provider.jwks_json},
        # Verified tokens by their text; a hit still checks expiry.
        "jwt_cache_config": {"jwt_cache_size": 4096},
        "claim_to_headers": [
            {"header_name": TENANT_HEADER, "claim_name": provider.tenant_claim},
            {"header_name": SCOPES_HEADER, "claim_name": "scope"},
            {"header_name": TOKEN_ID_HEADER, "claim_name": "jti"},
        ],
    }


# With no trusted provider yet, a token must still be required: this provider's JWKS
# holds a public key whose private half was never kept, so no token verifies.
_NO_PROVIDER = JwtProvider(
    name="none-trusted-yet", issuer=MESH_ISSUER, audiences=(MESH_AUDIENCE,),
    jwks_json=json.dumps({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "unusable",
        "x": "6EhF6W2mRTe29rk9jzxNs7liYMWvsI1JuoIFhPvDX2w",
        "y": "vlglKnrnPqQkFKF5CcLJZBJ9cc2Qd9q5bSngqMdJgMg"}]}))


def jwt_authentication(providers: Sequence[JwtProvider]) -> dict[str, Any]:
    """The JwtAuthentication config: public prefixes need no token, everything else one
    from any trusted provider."""
    trusted = list(providers) or [_NO_PROVIDER]
    names = [p.name for p in trusted]
    if len(set(names)) != len(names):
        raise ValueError(f"JWT provider names must be unique: {names}")
    any_provider: dict[str, Any] = (
        {"provider_name": names[0]} if len(names) == 1
        else {"requires_any": {"requirements": [{"provider_name": n} for n in names]}})
    token_if_sent = {"requires_any": {"requirements": [
        *({"provider_name": n} for n in names), {"allow_missing": {}}]}}
    return {
        "@type": f"type.googleapis.com/{JWT_TYPE}",
        "providers": {p.name: _provider_config(p) for p in trusted},
        "rules": [
            *({"match": {"prefix": prefix}, "requires": token_if_sent} for prefix in PUBLIC_PREFIXES),
            {"match": {"prefix": "/"}, "requires": any_provider},
        ],
    }


def write_jwt_config(spec: MeshSpec, providers: Sequence[JwtProvider]) -> Path:
    """Writes the ECDS file Envoy's jwt_authn reads (atomic: Envoy reloads on the rename)."""
    from .controller import write_atomically

    resource = {
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": JWT_FILTER,
        "typed_config": jwt_authentication(providers),
    }
    write_atomically(spec.jwt_config_path, yaml.safe_dump({"resources": [resource]}, sort_keys=False))
    return spec.jwt_config_path


def jwt_filter(spec: MeshSpec) -> dict[str, Any]:
    """The http_filters entry: jwt_authn configured from the ECDS file."""
    return {"name": JWT_FILTER, "config_discovery": {
        "config_source": {"resource_api_version": "V3", "path_config_source": {
            "path": str(spec.jwt_config_path),
            "watched_directory": {"path": str(spec.jwt_config_path.parent)}}},
        "type_urls": [f"type.googleapis.com/{JWT_TYPE}"],
    }}


def route_metadata(capability: str, model: str, public: bool, version: int) -> dict[str, Any]:
    """What the Lua filter reads from a route on every call: its constants and the version
    of the admission state (small: Envoy's Lua copies a route's metadata on each read)."""
    return {"filter_metadata": {LUA_FILTER: {
        "capability": capability, "model": model, "public": public, "version": version}}}


def virtual_host_metadata(admission: dict[str, Any]) -> dict[str, Any]:
    """The admission state, read by the Lua filter only when the routes' version changes."""
    return {"filter_metadata": {LUA_FILTER: {"admission": admission}}}


def write_routes(spec: MeshSpec, admission: dict[str, Any]) -> Path:
    """Writes the RDS file (every route; `admission` in the virtual host's metadata, its
    version in each route's) atomically; Envoy applies it to new calls on its next poll of
    the folder."""
    from .controller import write_atomically
    from .envoy_config import route_configuration

    resource = route_configuration(spec, admission)
    write_atomically(spec.routes_path, yaml.safe_dump({"resources": [resource]}, sort_keys=False))
    return spec.routes_path


# Copies {model} from `/v1/models/{model}:verb` (an HTTP/JSON call; the transcoder has
# already turned the path into the gRPC one and kept the original) into the routing
# header, and routes again. A gRPC caller sets the header itself.
_LUA_ROUTE_BY_MODEL = """
local function route_by_model(h)
  local original = h:headers():get("x-envoy-original-path")
  if original ~= nil then
    local model = string.match(original, "^/v1/models/([^/:?]+):")
    if model ~= nil then
      h:headers():replace("x-aimesh-model", model)
      h:clearRouteCache()
    end
  end
end
"""

# Attempts a call may cost, the front door's and the SDK's together: Envoy tries a call's
# first attempt up to 3 times (envoy_config's retry policy) and never an SDK retry, which
# is one attempt; so once Envoy has made 3, the SDK must not retry. A trailers-only
# failure after the last of them tells gRPC clients so ("don't retry": pushback -1); the
# router reports its count in x-envoy-attempt-count (include_attempt_count_in_response).
MAX_ATTEMPTS_PER_CALL = 3
_LUA_ATTEMPT_CAP = """
function envoy_on_response(h)
  local headers = h:headers()
  local status = headers:get("grpc-status")
  if status ~= nil and status ~= "0"
      and (tonumber(headers:get("x-envoy-attempt-count") or "") or 0) >= {MAX_ATTEMPTS} then
    headers:replace("grpc-retry-pushback-ms", "-1")
  end
end
""".replace("{MAX_ATTEMPTS}", str(MAX_ATTEMPTS_PER_CALL))

LUA_ROUTING_ONLY = _LUA_ROUTE_BY_MODEL + """
function envoy_on_request(h)
  route_by_model(h)
end
""" + _LUA_ATTEMPT_CAP


def _lua_refusals(*reasons: str) -> str:
    rows = (f'{name} = {{{error_model.TABLE[name].code}, "{error_model.TABLE[name].http_status}"}}'
            for name in reasons)
    return "{" + ", ".join(rows) + "}"


LUA_ADMISSION = _LUA_ROUTE_BY_MODEL + """
local DOMAIN = "{DOMAIN}"
-- reason -> {gRPC code, HTTP status}, from the mesh's error table (aimesh.error_model).
local REFUSALS = {REFUSALS}

-- google.rpc.Status and its details, protobuf-encoded by hand (varints, lengths).
local function varint(n)
  local out = {}
  repeat
    local byte = n % 128
    n = (n - byte) / 128
    if n > 0 then byte = byte + 128 end
    out[#out + 1] = string.char(byte)
  until n == 0
  return table.concat(out)
end
local function bytes_field(number, value)
  return varint(number * 8 + 2) .. varint(#value) .. value
end
local function any(type_name, value)
  return bytes_field(1, "type.googleapis.com/google.rpc." .. type_name) .. bytes_field(2, value)
end

local function json_string(s)
  local escaped = string.gsub(s, '[%c"\\\\]', function(c) return string.format("\\\\u%04x", string.byte(c)) end)
  return '"' .. escaped .. '"'
end

-- A refusal: {reason, message, metadata = {k = v}, quota = {subject, description},
-- retry_s}; the reason gives the codes. gRPC callers get grpc-status-details-bin; HTTP/JSON callers (the transcoder
-- kept their path) the HTTP status and a JSON google.rpc.Status, as the transcoder
-- renders a server's errors.
local function refuse(h, r)
  r.code = REFUSALS[r.reason][1]
  h:headers():replace("x-aimesh-refused", r.reason)
  local keys = {}
  for k in pairs(r.metadata or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  local retry_s = r.retry_s and math.max(1, math.ceil(r.retry_s))
  local headers = {[":status"] = REFUSALS[r.reason][2], ["x-aimesh-reason"] = r.reason}
  if retry_s ~= nil then headers["retry-after"] = tostring(retry_s) end
  if h:headers():get("x-envoy-original-path") ~= nil then
    local metadata = {}
    for _, k in ipairs(keys) do metadata[#metadata + 1] = json_string(k) .. ":" .. json_string(r.metadata[k]) end
    local details = {'{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":' .. json_string(r.reason) ..
                     ',"domain":' .. json_string(DOMAIN) .. ',"metadata":{' .. table.concat(metadata, ",") .. '}}'}
    if r.quota ~= nil then
      details[#details + 1] = '{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"subject":' ..
                              json_string(r.quota.subject) .. ',"description":' .. json_string(r.quota.description) .. '}]}'
    end
    if retry_s ~= nil then
      details[#details + 1] = '{"@type":"type.googleapis.com/google.rpc.RetryInfo","retry_delay":"' .. retry_s .. 's"}'
    end
    headers["content-type"] = "application/json"
    return h:respond(headers, '{"code":' .. r.code .. ',"message":' .. json_string(r.message) ..
                              ',"details":[' .. table.concat(details, ",") .. ']}')
  end
  local info = bytes_field(1, r.reason) .. bytes_field(2, DOMAIN)
  for _, k in ipairs(keys) do
    info = info .. bytes_field(3, bytes_field(1, k) .. bytes_field(2, r.metadata[k]))
  end
  local status = varint(8) .. varint(r.code) .. bytes_field(2, r.message) .. bytes_field(3, any("ErrorInfo", info))
  if r.quota ~= nil then
    local violation = bytes_field(1, r.quota.subject) .. bytes_field(2, r.quota.description)
    status = status .. bytes_field(3, any("QuotaFailure", bytes_field(1, violation)))
  end
  if retry_s ~= nil then
    status = status .. bytes_field(3, any("RetryInfo", bytes_field(1, varint(8) .. varint(retry_s))))
  end
  headers["grpc-status"] = tostring(r.code)
  -- gRPC clients must not retry a tenant's refusal on their own (the SDK's service config
  -- retries RESOURCE_EXHAUSTED from busy servers): the caller decides, with RetryInfo.
  headers["grpc-retry-pushback-ms"] = "-1"
  headers["grpc-status-details-bin"] = (string.gsub(h:base64Escape(status), "=+$", ""))
  h:respond(headers, r.message)
end

local function set_of(list)
  if list == nil then return nil end
  local out = {}
  for _, item in ipairs(list) do out[item] = true end
  return out
end

-- The admission state as published, turned into lookup tables once per version.
local STATE_VERSION = nil
local STATE = nil
local function state_for(h, version)
  if version ~= STATE_VERSION then
    local admission = h:virtualHost():metadata():get("admission") or {}
    local tenants = {}
    for id, t in pairs(admission.tenants or {}) do
      tenants[id] = {disabled = t.disabled == true, capabilities = set_of(t.capabilities),
                     models = set_of(t.models), requests = t.requests or {}, blocked = t.blocked or {}}
    end
    STATE = {enforce = admission.enforce == true, revoked = set_of(admission.revoked) or {},
             tenants = tenants}
    STATE_VERSION = version
  end
  return STATE
end

-- Entries of a {capability: {model: x}} table that apply to this call, most specific first.
local function matching(by_capability, capability, model)
  local out = {}
  for _, c in ipairs({capability, "*"}) do
    local by_model = by_capability[c]
    if by_model ~= nil then
      for _, m in ipairs({model, "*"}) do
        if by_model[m] ~= nil then out[#out + 1] = {c, m, by_model[m]} end
      end
    end
  end
  return out
end

-- Fixed-window request counters: key -> {window index, count}. Envoy runs one worker,
-- whose Lua globals every call on this front door shares.
local WINDOWS = {}

local function scoped(scopes, wanted)
  local padded = " " .. scopes .. " "
  return string.find(padded, " " .. wanted .. " ", 1, true) ~= nil
      or string.find(padded, " admin ", 1, true) ~= nil
end

local function admit(h)
  route_by_model(h)
  local meta = h:metadata()
  local version = meta:get("version")
  if version == nil or meta:get("public") then return end
  local headers = h:headers()
  local tenant_id = headers:get("x-aimesh-tenant")
  if tenant_id == nil then
    -- A verified token without the tenant claim (jwt_authn refuses calls with no token).
    return refuse(h, {reason = "UNAUTHENTICATED",
                      message = "the token names no tenant"})
  end
  local state = state_for(h, version)
  if not state.enforce then return end
  local token_id = headers:get("x-aimesh-token-id")
  if token_id ~= nil and state.revoked[token_id] then
    return refuse(h, {reason = "UNAUTHENTICATED",
                      message = "token " .. token_id .. " has been revoked",
                      metadata = {tenant = tenant_id, token_id = token_id}})
  end
  local tenant = state.tenants[tenant_id]
  if tenant == nil or tenant.disabled then
    local why = tenant == nil and "unknown" or "disabled"
    return refuse(h, {reason = "PERMISSION_DENIED",
                      message = "tenant " .. tenant_id .. " is " .. why,
                      metadata = {tenant = tenant_id, missing = "tenant"}})
  end
  local capability = meta:get("capability")
  local scopes = headers:get("x-aimesh-scopes") or ""
  if capability == "admin" then
    if not scoped(scopes, "admin") then
      return refuse(h, {reason = "PERMISSION_DENIED",
                        message = "the tenant API needs a token with scope admin",
                        metadata = {tenant = tenant_id, missing = "scope", scope = "admin"}})
    end
    return
  end
  if capability == "usage" or capability == "" then return end
  local model = meta:get("model")
  if not scoped(scopes, capability) then
    return refuse(h, {reason = "PERMISSION_DENIED",
                      message = "token scope '" .. scopes .. "' does not include " .. capability,
                      metadata = {tenant = tenant_id, missing = "scope", scope = capability}})
  end
  if tenant.capabilities ~= nil and not tenant.capabilities[capability] then
    return refuse(h, {reason = "PERMISSION_DENIED",
                      message = "tenant " .. tenant_id .. " may not use " .. capability,
                      metadata = {tenant = tenant_id, missing = "capability", capability = capability}})
  end
  if tenant.models ~= nil and not tenant.models[model] then
    return refuse(h, {reason = "PERMISSION_DENIED",
                      message = "tenant " .. tenant_id .. " may not use model " .. model,
                      metadata = {tenant = tenant_id, missing = "model", model = model}})
  end
  local now = os.time()
  for _, entry in ipairs(matching(tenant.blocked, capability, model)) do
    local block = entry[3]
    local until_s = tonumber(block["until"]) or 0
    if until_s > now then
      return refuse(h, {reason = block.reason or "RATE_LIMITED",
                        message = block.message or ("tenant " .. tenant_id .. " is over a limit"),
                        metadata = {tenant = tenant_id, capability = entry[1], model = entry[2]},
                        quota = {subject = block.subject or "limit",
                                 description = block.message or "limit reached"},
                        retry_s = until_s - now})
    end
  end
  local counted = {}
  for _, entry in ipairs(matching(tenant.requests, capability, model)) do
    local limit, window_s = entry[3][1], entry[3][2]
    local key = tenant_id .. "\\0" .. entry[1] .. "\\0" .. entry[2] .. "\\0" .. window_s
    local index = math.floor(now / window_s)
    local counter = WINDOWS[key]
    if counter == nil or counter[1] ~= index then
      counter = {index, 0}
      WINDOWS[key] = counter
    end
    if counter[2] >= limit then
      local subject = "requests per " .. window_s .. " s"
      local scope = entry[1] == "*" and "all capabilities" or entry[1]
      if entry[2] ~= "*" then scope = scope .. " on model " .. entry[2] end
      return refuse(h, {reason = "RATE_LIMITED",
                        message = "tenant " .. tenant_id .. " reached its limit of " .. limit .. " " ..
                                  subject .. " for " .. scope,
                        metadata = {tenant = tenant_id, capability = entry[1], model = entry[2],
                                    limit = tostring(limit), window_s = tostring(window_s)},
                        quota = {subject = subject, description = limit .. " " .. subject .. " for " .. scope},
                        retry_s = (index + 1) * window_s - now})
    end
    counted[#counted + 1] = counter
  end
  for _, counter in ipairs(counted) do counter[2] = counter[2] + 1 end
end

-- Fail closed: a call whose admission could not be decided (a bug, a malformed state) is
-- refused, never let through unchecked.
function envoy_on_request(h)
  local ok, err = pcall(admit, h)
  if not ok then
    h:logErr("aimesh admission failed: " .. tostring(err))
    refuse(h, {reason = "ENGINE_FAILURE",
               message = "the front door could not check this call; retry later"})
  end
end
""".replace("{DOMAIN}", DOMAIN).replace("{REFUSALS}", _lua_refusals(
    "UNAUTHENTICATED", "PERMISSION_DENIED", "RATE_LIMITED", "BUDGET_EXHAUSTED", "ENGINE_FAILURE")
) + _LUA_ATTEMPT_CAP


def lua_filter(tenancy: bool) -> dict[str, Any]:
    return {"name": LUA_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": LUA_ADMISSION if tenancy else LUA_ROUTING_ONLY},
    }}
