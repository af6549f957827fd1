"""Resource configuration: one TOML file shared by both nodes, validated up front.

Owns: the schema, defaults and the one-line error messages for bad configurations.
Must not: open disks or sockets.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field

from . import digest
from .peer import compress


class ConfigError(ValueError):
    """A configuration the operator must fix; str() is one clear line."""


RESOURCE_KEYS = {
    "name": str, "protocol": str, "shared-secret": str, "ping-interval": (int, float),
    "timeout": (int, float), "connect-interval": (int, float), "run-dir": str,
    "barrier-interval": (int, float), "resync-rate": str, "resync-window": int,
    "c-min-rate": str, "c-max-rate": str, "c-fill-target": str,
    "after-sb-0pri": str, "after-sb-1pri": str, "admin-group": str, "fencing": str,
    "on-io-error": str,
    "nbd-tls": str, "nbd-handshake-timeout": (int, float),
    "handshake-timeout": (int, float),
    "busy-poll": (int, float), "csums-alg": str, "verify-alg": str,
    "csums-after-crash-only": bool,
    "compression": str,
    "sndbuf-size": str, "congestion-fill": str, "on-congestion": str,
    "max-handshakes": int, "tls": bool, "tls-cert": str, "tls-key": str, "tls-ca": str,
    "metrics": str,
}
NODE_KEYS = {"address": str, "disk": str, "nbd": str, "meta-disk": str, "export": str,
             "nbd-tls-cert": str, "nbd-tls-key": str, "nbd-tls-ca": str,
             "tls-cert": str, "tls-key": str, "tls-ca": str, "tls-fingerprint": str,
             "metrics": str}
NBD_TLS_MODES = ("off", "on", "require")
TLS_FILES = ("tls-cert", "tls-key", "tls-ca")
MAX_NAME = 63  # resource and node names are stored in 64-byte metadata fields
FENCING = ("dont-care", "resource-only", "resource-and-stonith")
ON_IO_ERROR = ("detach", "pass-on")
HANDLER_KEYS = {"fence-peer": str, "unfence-peer": str, "split-brain": str,
                "initial-split-brain": str, "before-resync-target": str,
                "after-resync-target": str, "out-of-sync": str,
                "fence-peer-timeout": (int, float), "handler-timeout": (int, float)}
SB_POLICIES = ("disconnect", "discard-zero-changes", "discard-least-changes",
               "discard-younger-primary", "discard-secondary")


@dataclass
class NodeConfig:
    name: str
    address: tuple[str, int]
    disk: str
    nbd: tuple[str, int]
    meta_disk: str = "internal"
    export: str = ""
    nbd_tls_cert: str = ""  # X.509 certificate and key (PEM) of this node's NBD export
    nbd_tls_key: str = ""
    nbd_tls_ca: str = ""  # when set, NBD clients must present a certificate it signed
    tls_cert: str = ""  # this node's certificate, key and the CA that signed its peer's
    tls_key: str = ""
    tls_ca: str = ""
    tls_fingerprint: str = ""  # SHA-256 (hex) this node's certificate must have, or ""
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (docs/metrics.md), or off


@dataclass
class ResourceConfig:
    path: str
    name: str
    shared_secret: str
    nodes: dict[str, NodeConfig]
    protocol: str = "C"
    ping_interval: float = 1.0
    timeout: float = 4.0
    connect_interval: float = 0.5
    barrier_interval: float = 1.0
    run_dir: str = "/run/blockrep"
    admin_group: str | None = None  # may read status/events over the admin socket
    resync_rate: int = 0  # bytes/s, 0 = unlimited (adaptive controller still applies)
    resync_window: int = 32
    # DRBD's dynamic resync controller (docs/operations.md "Resync rate control"):
    c_min_rate: int = 32 << 20  # resync floor while the application writes; 0 = no throttle
    c_max_rate: int = 0  # resync ceiling, bytes/s; 0 = none (resync-rate caps too)
    c_fill_target: int = 0  # resync bytes in flight to aim for; 0 = resync-window requests
    after_sb_0pri: str = "disconnect"
    after_sb_1pri: str = "disconnect"
    nbd_tls: str = "off"  # off | on | require (docs/nbd.md)
    nbd_handshake_timeout: float = 10.0
    busy_poll: float = 0.0  # microseconds the loop keeps polling after I/O (shell/busypoll)
    compression: str = "none"  # none | lz4 | zstd (blockrep.peer.compress)
    compression_level: int = 0
    handshake_timeout: float = 5.0  # the whole link handshake, up to the peer's proof
    max_handshakes: int = 8  # inbound link connections not yet authenticated, at once
    sndbuf_size: int = 0  # bytes the link may hold unsent; 0 = unbounded
    congestion_fill: int = 0  # pull-ahead: go Ahead above this many unsent bytes
    on_congestion: str = "block"  # block | pull-ahead
    tls: bool = False
    csums_alg: str = digest.DEFAULT  # block digest of checksum-mode resync (blockrep.digest)
    # checksum-mode resync only after a Primary crash (DRBD's csums-after-crash-only);
    # false: every resync this node sources compares digests first
    csums_after_crash_only: bool = True
    verify_alg: str = digest.DEFAULT  # block digest of online verify
    fencing: str = "dont-care"
    on_io_error: str = "detach"  # detach | pass-on (docs/operations.md "Disk failures")
    handlers: dict = field(default_factory=dict)  # [handlers]: name -> shell command
    fence_peer_timeout: float = 60.0
    handler_timeout: float = 60.0  # every other handler is killed after this long
    raw: dict = field(default_factory=dict, repr=False)

    def node(self, name: str | None) -> NodeConfig:
        if name is None:
            name = socket.gethostname()
        if name not in self.nodes:
            raise ConfigError(f"{self.path}: no [node.{name}] section "
                              f"(nodes: {', '.join(sorted(self.nodes))}); use --node")
        return self.nodes[name]

    def peer_of(self, name: str) -> NodeConfig:
        return next(n for n in self.nodes.values() if n.name != name)

    def admin_socket(self, node: str) -> str:
        return os.path.join(self.run_dir, f"{self.name}.{node}.sock")


def parse_address(text, what: str, *, default_port: int | None = None,
                  default_host: str | None = None, any_port: bool = False) -> tuple[str, int]:
    """"HOST:PORT" ("[V6]:PORT") -> (host, port), the one address parser (configuration and
    command line). `default_port` allows a bare "HOST", `default_host` a bare ":PORT",
    `any_port` port 0 (a listener on any free port)."""
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected \"HOST:PORT\", got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep and default_port is not None:
        host, port = text, str(default_port)
    host = host.strip("[]") or (default_host or "")
    if not host:
        raise ConfigError(f"{what}: bad address {text!r} (expected HOST:PORT)")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{what}: bad address {text!r}: port is not a number") from None
    if not (0 if any_port else 1) <= p < 65536:
        raise ConfigError(f"{what}: bad address {text!r}: port out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost" and not all(c.isalnum() or c in "-." for c in host):
            raise ConfigError(f"{what}: bad address {text!r}: bad host") from None
    return host, p


WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def _host_key(host: str) -> str:
    h = host.lower()
    if h == "localhost":
        return "127.0.0.1"
    try:
        return ipaddress.ip_address(h).compressed
    except ValueError:
        return h


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(_host_key(host)).is_loopback
    except ValueError:
        return False


def _overlap(h1: str, h2: str) -> bool:
    """Would binding both (same port) clash on one machine?"""
    k1, k2 = _host_key(h1), _host_key(h2)
    return k1 == k2 or k1 in WILDCARD_HOSTS or k2 in WILDCARD_HOSTS


def _fmt(addr: tuple[str, int]) -> str:
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{host}:{addr[1]}"


def _check_clashes(path: str, a: "NodeConfig", b: "NodeConfig") -> None:
    """Listening addresses that cannot all be bound: a node's NBD address on its own
    replication port; when both nodes run on one machine (their replication hosts are the
    same, or both loopback), any address of one that the other also binds; and one routable
    address used by both nodes."""
    for n in (a, b):
        if n.nbd[1] == n.address[1] and _overlap(n.nbd[0], n.address[0]):
            raise ConfigError(f"{path}: node.{n.name}: nbd address {_fmt(n.nbd)} clashes with "
                              f"its replication address {_fmt(n.address)}; use another port")
        if n.metrics is not None:
            for what, e in (("replication", n.address), ("nbd", n.nbd)):
                if n.metrics[1] == e[1] and _overlap(n.metrics[0], e[0]):
                    raise ConfigError(f"{path}: node.{n.name}: metrics address "
                                      f"{_fmt(n.metrics)} clashes with its {what} address "
                                      f"{_fmt(e)}; use another port")
    ka, kb = _host_key(a.address[0]), _host_key(b.address[0])
    one_host = ka == kb or (_is_loopback(ka) and _is_loopback(kb))
    for what_a, ea in _endpoints(a):
        for what_b, eb in _endpoints(b):
            if ea[1] != eb[1]:
                continue
            if one_host:
                clash = _overlap(ea[0], eb[0])
            else:  # two machines: only the very same routable address clashes
                k = _host_key(ea[0])
                clash = k == _host_key(eb[0]) and k not in WILDCARD_HOSTS and \
                    not _is_loopback(k)
            if clash:
                raise ConfigError(
                    f"{path}: node.{a.name} ({what_a} {_fmt(ea)}) and node.{b.name} "
                    f"({what_b} {_fmt(eb)}) would listen on the same address"
                    + (" on one host" if one_host else "") + "; use another port")


def _endpoints(n: "NodeConfig") -> list:
    out = [("replication", n.address), ("nbd", n.nbd)]
    return out + [("metrics", n.metrics)] if n.metrics is not None else out


def _check_keys(table: dict, allowed: dict, where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}")
        typ = allowed[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            raise ConfigError(f"{where}.{key}: wrong type {type(value).__name__}")


# -- where configurations live: drbdadm reads /etc/drbd.d/*.res and global_common.conf;
# blockrep reads /etc/blockrep/*.toml (BLOCKREP_CONFIG_DIR overrides), one resource a file,
# and common.toml beside them holds [common]: defaults for every resource of the directory
DEFAULT_CONFIG_DIR = "/etc/blockrep"
COMMON_FILE = "common.toml"


def config_dir() -> str:
    return os.environ.get("BLOCKREP_CONFIG_DIR") or DEFAULT_CONFIG_DIR


def resource_files(directory: str | None = None) -> list[str]:
    """The resource files of the configuration directory (every *.toml but common.toml),
    sorted; [] when the directory does not exist."""
    directory = directory or config_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot list: {exc.strerror}") from None
    return [os.path.join(directory, n) for n in names
            if n.endswith(".toml") and n != COMMON_FILE
            and os.path.isfile(os.path.join(directory, n))]


def resolve(spec: str) -> str:
    """A resource named on the command line -> its file. A path (has a "/" or ends in
    .toml) is taken as it is; a name is looked up in the configuration directory: NAME.toml,
    else the file whose resource.name is NAME."""
    if os.sep in spec or spec.endswith(".toml"):
        return spec
    directory = config_dir()
    direct = os.path.join(directory, f"{spec}.toml")
    if os.path.isfile(direct):
        return direct
    names = []
    for path in resource_files(directory):
        try:
            with open(path, "rb") as f:
                name = tomllib.load(f).get("resource", {}).get("name")
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, AttributeError):
            continue  # reported when that resource itself is used
        if name == spec:
            return path
        names.append(str(name))
    known = f"resources there: {', '.join(names)}" if names else "no resources there"
    raise ConfigError(f"no resource {spec!r} in {directory} ({known}); give a name or the "
                      f"path of its .toml file")


def _read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return _toml(data, path)


def _toml(data: bytes, path: str) -> dict:
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_common(directory: str) -> dict:
    """[common] of the directory's common.toml (resource keys and a [common.handlers]
    table), or {} when there is none."""
    path = os.path.join(directory, COMMON_FILE)
    if not os.path.exists(path):
        return {}
    raw = _read_toml(path)
    for key in raw:
        if key != "common":
            raise ConfigError(f"{path}: unknown section [{key}] (common.toml holds [common] "
                              f"and [common.handlers] only)")
    common = raw.get("common", {})
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: [common] must be a table")
    allowed = {k: v for k, v in RESOURCE_KEYS.items() if k != "name"}
    allowed["handlers"] = dict
    _check_keys(common, allowed, f"{path}: common")
    handlers = common.get("handlers", {})
    if not isinstance(handlers, dict):
        raise ConfigError(f"{path}: [common.handlers] must be a table")
    _check_keys(handlers, HANDLER_KEYS, f"{path}: common.handlers")
    return common


def with_common(raw: dict, common: dict) -> dict:
    """The resource's own settings over the common ones ([handlers] merged by key)."""
    merged = dict(raw)
    if isinstance(raw.get("resource"), dict):  # else parse() says what is wrong
        defaults = {k: v for k, v in common.items() if k != "handlers"}
        merged["resource"] = {**defaults, **raw["resource"]}
    own = raw.get("handlers", {})
    if "handlers" in common and isinstance(own, dict):
        merged["handlers"] = {**common["handlers"], **own}
    return merged


def load(path: str) -> ResourceConfig:
    """A resource file, with the [common] defaults of the common.toml beside it."""
    raw = _read_toml(path)
    return parse(with_common(raw, load_common(os.path.dirname(path) or ".")), path)


def loads(data: bytes, path: str = "<config>") -> ResourceConfig:
    """The text of a configuration file -> ResourceConfig (or one ConfigError)."""
    return parse(_toml(data, path), path)


def parse(raw: dict, path: str = "<config>") -> ResourceConfig:
    from .disk import parse_size

    for key in raw:
        if key not in ("resource", "node", "handlers"):
            raise ConfigError(f"{path}: unknown section [{key}]")
    res = raw.get("resource")
    if not isinstance(res, dict):
        raise ConfigError(f"{path}: missing [resource] section")
    _check_keys(res, RESOURCE_KEYS, f"{path}: resource")
    for key in ("name", "shared-secret"):
        if not res.get(key):
            raise ConfigError(f"{path}: resource.{key} is required")
    name = res["name"]
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{path}: resource.name {name!r}: use letters, digits, - _ .")
    if len(name.encode()) > MAX_NAME:
        raise ConfigError(f"{path}: resource.name is longer than {MAX_NAME} bytes")
    protocol = res.get("protocol", "C")
    if protocol not in ("A", "B", "C"):
        raise ConfigError(f"{path}: resource.protocol {protocol!r}: use \"A\", \"B\" or "
                          f"\"C\"")
    nodes_raw = raw.get("node")
    if not isinstance(nodes_raw, dict) or len(nodes_raw) != 2:
        raise ConfigError(f"{path}: exactly two [node.NAME] sections are required")
    nodes = {}
    for nname, table in nodes_raw.items():
        where = f"{path}: node.{nname}"
        if len(nname.encode()) > MAX_NAME:
            raise ConfigError(f"{where}: node name is longer than {MAX_NAME} bytes")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        _check_keys(table, NODE_KEYS, where)
        for key in ("address", "disk", "nbd"):
            if key not in table:
                raise ConfigError(f"{where}.{key} is required")
        nodes[nname] = NodeConfig(
            name=nname,
            address=parse_address(table["address"], f"{where}.address"),
            disk=table["disk"],
            nbd=parse_address(table["nbd"], f"{where}.nbd"),
            meta_disk=table.get("meta-disk", "internal"),
            export=table.get("export", ""),
            nbd_tls_cert=table.get("nbd-tls-cert", ""),
            nbd_tls_key=table.get("nbd-tls-key", ""),
            nbd_tls_ca=table.get("nbd-tls-ca", ""),
            tls_cert=table.get("tls-cert", res.get("tls-cert", "")),
            tls_key=table.get("tls-key", res.get("tls-key", "")),
            tls_ca=table.get("tls-ca", res.get("tls-ca", "")),
            tls_fingerprint=_fingerprint(table.get("tls-fingerprint", ""),
                                         f"{where}.tls-fingerprint"),
            metrics=_metrics_address(table, res, where, path),
        )
    a, b = nodes.values()
    if a.address == b.address:
        raise ConfigError(f"{path}: both nodes use the replication address "
                          f"{a.address[0]}:{a.address[1]}")
    _check_clashes(path, a, b)
    cfg = ResourceConfig(path=path, name=name, shared_secret=res["shared-secret"],
                         nodes=nodes, protocol=protocol, raw=raw)
    for key, attr in (("ping-interval", "ping_interval"), ("timeout", "timeout"),
                      ("connect-interval", "connect_interval"),
                      ("barrier-interval", "barrier_interval"),
                      ("nbd-handshake-timeout", "nbd_handshake_timeout")):
        if key in res:
            if not 0 < res[key] < math.inf:  # also refuses nan
                raise ConfigError(f"{path}: resource.{key} must be positive and finite "
                                  f"(got {res[key]!r})")
            setattr(cfg, attr, float(res[key]))
    if "busy-poll" in res:
        if not 0 <= res["busy-poll"] <= 10_000:
            raise ConfigError(f"{path}: resource.busy-poll must be 0-10000 microseconds "
                              f"(got {res['busy-poll']!r})")
        cfg.busy_poll = float(res["busy-poll"])
    if "compression" in res:
        try:
            cfg.compression, cfg.compression_level = compress.parse(res["compression"])
        except ValueError as exc:
            raise ConfigError(f"{path}: resource.compression: {exc}") from None
    if cfg.timeout <= cfg.ping_interval:
        raise ConfigError(f"{path}: resource.timeout must exceed resource.ping-interval")
    if "run-dir" in res:
        cfg.run_dir = res["run-dir"]
    if "admin-group" in res:
        cfg.admin_group = res["admin-group"]
    for key in ("sndbuf-size", "congestion-fill"):
        if key in res:
            try:
                value = 0 if res[key] == "0" else parse_size(res[key])
            except ValueError as exc:
                raise ConfigError(f"{path}: resource.{key}: {exc}") from None
            setattr(cfg, key.replace("-", "_"), value)
    if "on-congestion" in res:
        if res["on-congestion"] not in ("block", "pull-ahead"):
            raise ConfigError(f"{path}: resource.on-congestion {res['on-congestion']!r}: "
                              f"use \"block\" or \"pull-ahead\"")
        cfg.on_congestion = res["on-congestion"]
    if cfg.on_congestion == "pull-ahead" and not (cfg.congestion_fill or cfg.sndbuf_size):
        raise ConfigError(f"{path}: resource.on-congestion = \"pull-ahead\" needs "
                          f"congestion-fill (or sndbuf-size)")
    if "resync-rate" in res:
        try:
            cfg.resync_rate = parse_size(res["resync-rate"]) if res["resync-rate"] != "0" else 0
        except ValueError as exc:
            raise ConfigError(f"{path}: resource.resync-rate: {exc}") from None
    for key in ("c-min-rate", "c-max-rate", "c-fill-target"):
        if key in res:
            try:
                v = parse_size(res[key]) if res[key] != "0" else 0
            except ValueError as exc:
                raise ConfigError(f"{path}: resource.{key}: {exc}") from None
            setattr(cfg, key.replace("-", "_"), v)
    if "resync-window" in res:
        if not 1 <= res["resync-window"] <= 256:
            raise ConfigError(f"{path}: resource.resync-window must be 1..256")
        cfg.resync_window = res["resync-window"]
    for key, attr in (("after-sb-0pri", "after_sb_0pri"), ("after-sb-1pri", "after_sb_1pri")):
        if key in res:
            if res[key] not in SB_POLICIES:
                raise ConfigError(f"{path}: resource.{key} {res[key]!r}: one of "
                                  f"{', '.join(SB_POLICIES)}")
            setattr(cfg, attr, res[key])
    cfg.nbd_tls = res.get("nbd-tls", "off")
    if cfg.nbd_tls not in NBD_TLS_MODES:
        raise ConfigError(f"{path}: resource.nbd-tls {cfg.nbd_tls!r}: one of "
                          f"{', '.join(NBD_TLS_MODES)}")
    for n in nodes.values():
        if cfg.nbd_tls != "off" and not (n.nbd_tls_cert and n.nbd_tls_key):
            raise ConfigError(f"{path}: node.{n.name}: nbd-tls = {cfg.nbd_tls} needs "
                              f"nbd-tls-cert and nbd-tls-key")
    if "handshake-timeout" in res:
        if res["handshake-timeout"] <= 0:
            raise ConfigError(f"{path}: resource.handshake-timeout must be positive")
        cfg.handshake_timeout = float(res["handshake-timeout"])
    if "max-handshakes" in res:
        if not 1 <= res["max-handshakes"] <= 1024:
            raise ConfigError(f"{path}: resource.max-handshakes must be 1..1024")
        cfg.max_handshakes = res["max-handshakes"]
    cfg.tls = res.get("tls", False)
    cfg.csums_after_crash_only = res.get("csums-after-crash-only", True)
    if cfg.tls:
        for n in nodes.values():
            for key in TLS_FILES:
                if not getattr(n, key.replace("-", "_")):
                    raise ConfigError(f"{path}: tls = true needs {key} in [node.{n.name}] "
                                      f"or [resource]")
    for key in ("csums-alg", "verify-alg"):
        if key in res:
            try:
                setattr(cfg, key.replace("-", "_"), digest.check(res[key]))
            except ValueError as exc:
                raise ConfigError(f"{path}: resource.{key}: {exc}") from None
    if "fencing" in res:
        if res["fencing"] not in FENCING:
            raise ConfigError(f"{path}: resource.fencing {res['fencing']!r}: one of "
                              f"{', '.join(FENCING)}")
        cfg.fencing = res["fencing"]
    if "on-io-error" in res:
        if res["on-io-error"] not in ON_IO_ERROR:
            raise ConfigError(f"{path}: resource.on-io-error {res['on-io-error']!r}: one of "
                              f"{', '.join(ON_IO_ERROR)}")
        cfg.on_io_error = res["on-io-error"]
    handlers = raw.get("handlers", {})
    if not isinstance(handlers, dict):
        raise ConfigError(f"{path}: [handlers] must be a table")
    _check_keys(handlers, HANDLER_KEYS, f"{path}: handlers")
    cfg.handlers = {k: v for k, v in handlers.items() if isinstance(v, str)}
    for key, attr in (("fence-peer-timeout", "fence_peer_timeout"),
                      ("handler-timeout", "handler_timeout")):
        if key in handlers:
            if not 0 < handlers[key] < math.inf:
                raise ConfigError(f"{path}: handlers.{key} must be positive and finite")
            setattr(cfg, attr, float(handlers[key]))
    if cfg.fencing != "dont-care" and not cfg.handlers.get("fence-peer"):
        raise ConfigError(f"{path}: resource.fencing = \"{cfg.fencing}\" needs "
                          f"handlers.fence-peer")
    return cfg


def _metrics_address(table: dict, res: dict, where: str, path: str):
    """[node.X] metrics, else [resource] metrics: "HOST:PORT", or "" / absent = off."""
    if "metrics" in table:
        text, what = table["metrics"], f"{where}.metrics"
    else:
        text, what = res.get("metrics", ""), f"{path}: resource.metrics"
    return parse_address(text, what) if text else None


def _fingerprint(text: str, what: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and case are ignored)."""
    if not text:
        return ""
    hexdigits = text.replace(":", "").lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ConfigError(f"{what}: expected a SHA-256 fingerprint (64 hex digits), got "
                          f"{text!r}")
    return hexdigits
