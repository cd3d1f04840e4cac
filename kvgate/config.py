"""Gateway configuration: the Dubbo-go-Pixiu YAML shape, as pydantic models.

``listeners`` may sit at the top level or under ``static_resources`` (Pixiu's own layout); likewise
``clusters``. Unknown keys are kept and reported as warnings (Pixiu ignores them silently); any
invalid value raises :class:`~kvgate.errors.ConfigError` naming the exact key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvgate.durations import parse_duration
from kvgate.errors import ConfigError

Duration = Annotated[float, BeforeValidator(parse_duration)]

LB_POLICIES: dict[str, str] = {
    # Pixiu names
    "roundrobin": "round_robin",
    "rand": "random",
    "ringhashing": "ring_hash",
    "maglevhashing": "maglev",
    "weightrandom": "weighted_random",
    # readable aliases
    "round_robin": "round_robin",
    "random": "random",
    "least_request": "least_request",
    "leastrequest": "least_request",
    "ring_hash": "ring_hash",
    "consistent_hash": "ring_hash",
    "maglev": "maglev",
    "weighted_random": "weighted_random",
}

RETRY_POLICIES = {"noretry": "NoRetry", "countbased": "CountBased", "exponentialbackoff": "ExponentialBackoff"}


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, validate_default=True)


class SocketAddress(Model):
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("address must not be empty")
        return v


class RetryPolicy(Model):
    name: str = "NoRetry"
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        canon = RETRY_POLICIES.get(v.strip().lower())
        if canon is None:
            raise ValueError(f"unknown retry policy {v!r} (use NoRetry, CountBased or ExponentialBackoff)")
        return canon

    @model_validator(mode="after")
    def _check_config(self) -> RetryPolicy:
        times = self.config.get("times", 2)
        if not isinstance(times, int) or isinstance(times, bool) or times < 0:
            raise ValueError("config.times must be an integer >= 0")
        for key in ("initialInterval", "maxInterval"):
            if key in self.config:
                try:
                    if parse_duration(self.config[key]) < 0:
                        raise ValueError
                except ValueError as exc:
                    raise ValueError(f"config.{key} must be a duration >= 0") from exc
        mult = self.config.get("multiplier", 2.0)
        if not isinstance(mult, int | float) or isinstance(mult, bool) or mult < 1:
            raise ValueError("config.multiplier must be a number >= 1")
        return self


class LLMMeta(Model):
    provider: str | None = None
    api_key: str | None = None
    retry_policy: RetryPolicy = Field(default_factory=RetryPolicy)
    fallback: bool = False
    health_check_interval: int = Field(default=5000, ge=0, description="passive cooldown, milliseconds")


class Endpoint(Model):
    id: str = Field(validation_alias="id")
    socket_address: SocketAddress
    llm_meta: LLMMeta = Field(default_factory=LLMMeta)
    weight: int = Field(default=1, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _id_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "id" not in data and "ID" in data:
            data = dict(data)
            data["id"] = data.pop("ID")
        return data

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not str(v).strip():
            raise ValueError("endpoint id must not be empty")
        return str(v).strip()

    @property
    def base_url(self) -> str:
        host = self.socket_address.address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.socket_address.port}"


class ActiveHealthCheck(Model):
    path: str = "/health"
    scheme: str | None = Field(default=None, description="http or https; default: the proxy filter's scheme")
    interval: Duration = Field(default=5.0, gt=0)
    timeout: Duration = Field(default=1.0, gt=0)
    unhealthy_threshold: int = Field(default=2, ge=1)
    healthy_threshold: int = Field(default=1, ge=1)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("path must start with '/'")
        return v

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and v.strip().lower() not in ("http", "https"):
            raise ValueError("scheme must be http or https")
        return v.strip().lower() if v is not None else None


class OutlierDetection(Model):
    """Envoy-style 5xx outlier detection: ``consecutive_5xx`` 5xx answers from distinct requests eject the
    endpoint for ``base_ejection_time`` × 2^(ejections-1), at most ``max_ejection_time``."""

    consecutive_5xx: int = Field(default=5, ge=1)
    base_ejection_time: Duration = Field(default=30.0, gt=0)
    max_ejection_time: Duration = Field(default=300.0, gt=0)


class Cluster(Model):
    name: str
    lb_policy: str = "RoundRobin"
    endpoints: list[Endpoint] = Field(min_length=1)
    hash_header: str = "x-session-id"
    health_check: ActiveHealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    max_ejection_time: Duration = Field(default=300.0, gt=0, description="cap of the passive cooldown back-off")

    @field_validator("lb_policy")
    @classmethod
    def _lb(cls, v: str) -> str:
        canon = LB_POLICIES.get(v.strip().lower())
        if canon is None:
            raise ValueError(
                f"unknown lb_policy {v!r} (use RoundRobin, Rand, RingHashing, MaglevHashing, WeightRandom, "
                "round_robin, random or least_request)"
            )
        return canon

    @model_validator(mode="after")
    def _unique_ids(self) -> Cluster:
        seen: set[str] = set()
        for i, ep in enumerate(self.endpoints):
            if ep.id in seen:
                raise ConfigError(f"endpoints[{i}].id", f"duplicate endpoint id {ep.id!r}")
            seen.add(ep.id)
        return self


class RouteMatch(Model):
    prefix: str = "/"
    path: str | None = None


class RouteAction(Model):
    cluster: str


class Route(Model):
    match: RouteMatch = Field(default_factory=RouteMatch)
    route: RouteAction


class RouteConfig(Model):
    routes: list[Route] = Field(default_factory=list)


class HttpFilterConfig(Model):
    name: str
    config: dict[str, Any] | None = None


class HttpConnectionManager(Model):
    route_config: RouteConfig = Field(default_factory=RouteConfig)
    http_filters: list[HttpFilterConfig] = Field(default_factory=list)
    timeout: Duration = 10.0
    max_request_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # Decision headers (x-kvgate-endpoint, x-kvgate-kvcache*) tell a client where a prompt is cached: a
    # cross-tenant side channel. Off by default; on for every request, or only for requests carrying
    # ``decision_headers_token_header: <decision_headers_token>``.
    decision_headers: bool = False
    decision_headers_token: str = ""
    decision_headers_token_header: str = "x-kvgate-debug-token"
    # X-Forwarded-For / Forwarded (Envoy's xff_num_trusted_hops): 0 = incoming values are not trusted and
    # are replaced by the peer address; N > 0 = the incoming chain is kept and the peer address appended.
    xff_num_trusted_hops: int = Field(default=0, ge=0)
    # Client-side limits of the HTTP server (nginx / Envoy defaults).
    request_headers_timeout: Duration = Field(default=60.0, gt=0, description="whole request head; nginx 60s")
    request_body_timeout: Duration = Field(default=60.0, gt=0, description="max gap between body reads; nginx 60s")
    max_request_headers_kb: int = Field(default=60, ge=1, le=8192, description="Envoy 60 KiB")
    max_request_headers_count: int = Field(default=100, ge=1, description="Envoy headers_count 100")
    idle_timeout: Duration = Field(default=60.0, gt=0, description="idle keep-alive connections are closed")
    max_idle_connections: int = Field(default=1024, ge=0, description="idle keep-alive connections kept; 0 = none")

    @field_validator("decision_headers_token_header")
    @classmethod
    def _token_header(cls, v: str) -> str:
        v = v.strip().lower()
        if not v or any(c in v for c in " :\t\r\n"):
            raise ValueError("must be a header name")
        return v


class NetworkFilter(Model):
    name: str
    config: HttpConnectionManager | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v != "dgp.filter.httpconnectionmanager":
            raise ValueError(f"unknown network filter {v!r} (only dgp.filter.httpconnectionmanager is supported)")
        return v


class FilterChain(Model):
    filters: list[NetworkFilter] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("filters"), dict):
            data = dict(data)
            data["filters"] = [data["filters"]]
        return data


class ListenerAddress(Model):
    socket_address: SocketAddress


class Listener(Model):
    name: str = "net/http"
    protocol_type: str = "HTTP"
    address: ListenerAddress = Field(
        default_factory=lambda: ListenerAddress(socket_address=SocketAddress(address="127.0.0.1", port=8888))
    )
    filter_chains: FilterChain

    @model_validator(mode="before")
    @classmethod
    def _chains(cls, data: Any) -> Any:
        # Pixiu accepts filter_chains as an object or as a one-element list.
        if isinstance(data, dict) and isinstance(data.get("filter_chains"), list):
            chains = data["filter_chains"]
            if len(chains) != 1:
                raise ValueError("filter_chains: exactly one filter chain is supported")
            data = dict(data)
            data["filter_chains"] = chains[0]
        return data

    @field_validator("protocol_type")
    @classmethod
    def _proto(cls, v: str) -> str:
        if v.upper() != "HTTP":
            raise ValueError(f"unsupported protocol_type {v!r} (only HTTP)")
        return "HTTP"

    @property
    def hcm(self) -> HttpConnectionManager:
        for f in self.filter_chains.filters:
            if f.config is not None:
                return f.config
        return HttpConnectionManager()


class AdminConfig(Model):
    address: str = "127.0.0.1"
    port: int = Field(default=9901, ge=0, le=65535)
    token: str = Field(default="", description="bearer token required by /config and /metrics; empty = none")


class GatewayConfig(Model):
    listeners: list[Listener] = Field(min_length=1)
    clusters: list[Cluster] = Field(default_factory=list)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    @model_validator(mode="before")
    @classmethod
    def _static_resources(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("static_resources"), dict):
            data = dict(data)
            sr = data.pop("static_resources")
            for key in ("listeners", "clusters"):
                if key in sr and key not in data:
                    data[key] = sr[key]
            extra = {k: v for k, v in sr.items() if k not in ("listeners", "clusters")}
            if extra:
                data.setdefault("_static_resources_extra", extra)
        return data

    @model_validator(mode="after")
    def _cross_refs(self) -> GatewayConfig:
        names: set[str] = set()
        for i, c in enumerate(self.clusters):
            if c.name in names:
                raise ConfigError(f"clusters[{i}].name", f"duplicate cluster name {c.name!r}")
            names.add(c.name)
        for li, lst in enumerate(self.listeners):
            for fi, nf in enumerate(lst.filter_chains.filters):
                if nf.config is None:
                    continue
                for ri, r in enumerate(nf.config.route_config.routes):
                    if r.route.cluster not in names:
                        raise ConfigError(
                            f"listeners[{li}].filter_chains.filters[{fi}].config.route_config.routes[{ri}].route.cluster",
                            f"unknown cluster {r.route.cluster!r} (defined: {sorted(names) or 'none'})",
                        )
        return self

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "model-")) or part in ("function-after", "function-before"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def config_error_from_validation(exc: ValidationError, prefix: str = "") -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p and "]" in p and "-" in p)))
    path = _loc_path(loc)
    ctx_err = err.get("ctx", {}).get("error") if err.get("ctx") else None
    if isinstance(ctx_err, ConfigError):
        sub = ctx_err.path
        path = f"{path}.{sub}" if path and not sub.startswith("[") else f"{path}{sub}"
        reason = ctx_err.reason
    else:
        reason = str(err["msg"]).removeprefix("Value error, ")
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    return ConfigError(path, reason)


def unknown_keys(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of keys present in the YAML that no model field consumes."""
    out: list[str] = []
    for key, value in (model.model_extra or {}).items():
        if key == "_static_resources_extra" and isinstance(value, dict):
            out.extend(f"static_resources.{k}" for k in value)
            continue
        if key.startswith("_"):
            continue
        out.append(f"{prefix}.{key}" if prefix else key)
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, BaseModel):
            out.extend(unknown_keys(value, path))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out.extend(unknown_keys(item, f"{path}[{i}]"))
    return out


def parse_config(data: Any) -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError("", "config must be a YAML mapping with 'listeners' and 'clusters'")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error_from_validation(exc) from None
    except ConfigError:
        raise


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML in {str(p)!r}: {exc}") from None
    return parse_config(data)
