"""blockrep.config: a valid file parses with defaults; every bad input is one ConfigError
with a one-line message that names the offending key."""

from __future__ import annotations

import copy
import os

import pytest

from blockrep import config
from blockrep.config import ConfigError, NodeConfig, load, parse, parse_address


def base() -> dict:
    return {
        "resource": {"name": "r0", "shared-secret": "s3cret"},
        "node": {
            "alpha": {"address": "10.0.0.1:7789", "disk": "/dev/vdb", "nbd": "127.0.0.1:10809"},
            "beta": {"address": "10.0.0.2:7789", "disk": "/dev/vdc", "nbd": "127.0.0.1:10810"},
        },
    }


def with_(mutate) -> dict:
    raw = copy.deepcopy(base())
    mutate(raw)
    return raw


def bad(raw, *fragments, path="<config>"):
    with pytest.raises(ConfigError) as ei:
        parse(raw, path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# -- valid -------------------------------------------------------------------------------------

def test_valid_minimal_with_defaults():
    cfg = parse(base(), "/etc/blockrep/r0.toml")
    assert cfg.path == "/etc/blockrep/r0.toml"
    assert cfg.name == "r0" and cfg.shared_secret == "s3cret"
    assert cfg.protocol == "C"
    assert (cfg.ping_interval, cfg.timeout, cfg.connect_interval, cfg.barrier_interval) == \
        (1.0, 4.0, 0.5, 1.0)  # docs/operations.md
    assert cfg.run_dir == "/run/blockrep"
    assert cfg.resync_rate == 0 and cfg.resync_window == 32
    assert cfg.after_sb_0pri == cfg.after_sb_1pri == "disconnect"
    assert set(cfg.nodes) == {"alpha", "beta"}
    a = cfg.nodes["alpha"]
    assert a == NodeConfig(name="alpha", address=("10.0.0.1", 7789), disk="/dev/vdb",
                           nbd=("127.0.0.1", 10809), meta_disk="internal", export="")
    assert cfg.raw == base()


def test_valid_full():
    def m(raw):
        raw["resource"].update({
            "protocol": "C", "ping-interval": 2, "timeout": 10.5, "connect-interval": 1,
            "barrier-interval": 0.05, "run-dir": "/run/br", "resync-rate": "100M",
            "resync-window": 8, "after-sb-0pri": "discard-least-changes",
            "after-sb-1pri": "discard-secondary"})
        raw["node"]["alpha"].update({"meta-disk": "/var/lib/br/alpha.md", "export": "exp"})
        raw["node"]["beta"]["address"] = "[fd00::2]:7789"
    cfg = parse(with_(m))
    assert cfg.ping_interval == 2.0 and isinstance(cfg.ping_interval, float)
    assert cfg.timeout == 10.5 and cfg.connect_interval == 1.0
    assert cfg.barrier_interval == 0.05 and cfg.run_dir == "/run/br"
    assert cfg.resync_rate == 100 << 20 and cfg.resync_window == 8
    assert cfg.after_sb_0pri == "discard-least-changes"
    assert cfg.after_sb_1pri == "discard-secondary"
    assert cfg.nodes["alpha"].meta_disk == "/var/lib/br/alpha.md"
    assert cfg.nodes["alpha"].export == "exp"
    assert cfg.nodes["beta"].address == ("fd00::2", 7789)


def test_resync_rate_zero_means_unlimited():
    cfg = parse(with_(lambda r: r["resource"].update({"resync-rate": "0"})))
    assert cfg.resync_rate == 0


def test_load_from_file(tmp_path):
    p = tmp_path / "r0.toml"
    p.write_text("""
[resource]
name = "r0"
shared-secret = "x"
timeout = 6

[node.alpha]
address = "10.0.0.1:7789"
disk = "/dev/vdb"
nbd = "127.0.0.1:10809"

[node.beta]
address = "localhost:7790"
disk = "/dev/vdc"
nbd = "127.0.0.1:10810"
""")
    cfg = load(str(p))
    assert cfg.path == str(p)
    assert cfg.timeout == 6.0
    assert cfg.nodes["beta"].address == ("localhost", 7790)


# -- bad structure -----------------------------------------------------------------------------

def test_unknown_section():
    bad(with_(lambda r: r.update({"global": {}})), "unknown section [global]")


def test_missing_resource_section():
    bad(with_(lambda r: r.pop("resource")), "missing [resource]")
    bad(with_(lambda r: r.update({"resource": "r0"})), "missing [resource]")


def test_unknown_key_in_resource():
    bad(with_(lambda r: r["resource"].update({"protocoll": "C"})), "resource",
        "unknown key 'protocoll'")


def test_unknown_key_in_node():
    bad(with_(lambda r: r["node"]["beta"].update({"adress": "x:1"})), "node.beta",
        "unknown key 'adress'")


@pytest.mark.parametrize("key, value", [
    ("name", 5), ("shared-secret", ["a"]), ("timeout", "4"), ("ping-interval", True),
    ("resync-window", 2.5), ("resync-rate", 100),
])
def test_wrong_types_in_resource(key, value):
    bad(with_(lambda r: r["resource"].update({key: value})), f"resource.{key}", "wrong type")


def test_wrong_type_in_node():
    bad(with_(lambda r: r["node"]["alpha"].update({"disk": 3})), "node.alpha.disk",
        "wrong type")


@pytest.mark.parametrize("key", ["name", "shared-secret"])
def test_missing_required_resource_keys(key):
    bad(with_(lambda r: r["resource"].pop(key)), f"resource.{key} is required")
    bad(with_(lambda r: r["resource"].update({key: ""})), f"resource.{key} is required")


@pytest.mark.parametrize("name", ["r 0", "r/0", "../x", "r0;rm"])
def test_bad_resource_name(name):
    bad(with_(lambda r: r["resource"].update({"name": name})), "resource.name")


@pytest.mark.parametrize("nodes", [
    {},
    {"alpha": {"address": "10.0.0.1:7789", "disk": "/d", "nbd": "127.0.0.1:1"}},
    {n: {"address": f"10.0.0.{i}:7789", "disk": "/d", "nbd": "127.0.0.1:1"}
     for i, n in enumerate(["a", "b", "c"], 1)},
    "alpha",
])
def test_not_exactly_two_nodes(nodes):
    bad(with_(lambda r: r.update({"node": nodes})), "exactly two [node.NAME] sections")


def test_missing_node_section():
    bad(with_(lambda r: r.pop("node")), "exactly two")


def test_node_not_a_table():
    bad(with_(lambda r: r["node"].update({"beta": "10.0.0.2:7789"})), "node.beta",
        "must be a table")


@pytest.mark.parametrize("key", ["address", "disk", "nbd"])
def test_missing_node_keys(key):
    bad(with_(lambda r: r["node"]["alpha"].pop(key)), f"node.alpha.{key} is required")


# -- addresses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:7789", ("10.0.0.1", 7789)),
    ("localhost:1", ("localhost", 1)),
    ("node-1.example.com:65535", ("node-1.example.com", 65535)),
    ("[::1]:7789", ("::1", 7789)),
    ("[fe80::1]:80", ("fe80::1", 80)),
])
def test_parse_address_ok(text, expected):
    assert parse_address(text, "x") == expected


@pytest.mark.parametrize("text, fragment", [
    ("10.0.0.1", "expected HOST:PORT"),          # no port
    (":7789", "expected HOST:PORT"),             # no host
    ("10.0.0.1:http", "port is not a number"),
    ("10.0.0.1:", "port is not a number"),
    ("10.0.0.1:0", "port out of range"),
    ("10.0.0.1:65536", "port out of range"),
    ("10.0.0.1:-1", "port out of range"),
    ("bad host:7789", "bad host"),
    ("a/b:7789", "bad host"),
    ("x_y:7789", "bad host"),
])
def test_bad_address(text, fragment):
    msg = bad(with_(lambda r: r["node"]["alpha"].update({"address": text})),
              "node.alpha.address", fragment)
    assert repr(text) in msg


def test_bad_nbd_address():
    bad(with_(lambda r: r["node"]["beta"].update({"nbd": "127.0.0.1"})), "node.beta.nbd",
        "HOST:PORT")


def test_parse_address_non_string():
    with pytest.raises(ConfigError, match="expected"):
        parse_address(7789, "node.a.address")


def test_same_replication_address():
    def m(raw):
        raw["node"]["beta"]["address"] = raw["node"]["alpha"]["address"]
    bad(with_(m), "both nodes use the replication address 10.0.0.1:7789")


def test_same_address_with_brackets_detected():
    def m(raw):
        raw["node"]["alpha"]["address"] = "[::1]:7789"
        raw["node"]["beta"]["address"] = "::1:7789"
    bad(with_(m), "both nodes use the replication address")


def test_same_host_different_ports_ok():
    def m(raw):
        raw["node"]["alpha"]["address"] = "127.0.0.1:7789"
        raw["node"]["beta"]["address"] = "127.0.0.1:7790"
    assert parse(with_(m)).nodes["beta"].address == ("127.0.0.1", 7790)


# -- resource options --------------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["c", "", "D"])
def test_protocol_unknown(proto):
    bad(with_(lambda r: r["resource"].update({"protocol": proto})), "resource.protocol",
        "use \"A\", \"B\" or \"C\"")


@pytest.mark.parametrize("proto", ["A", "B", "C"])
def test_protocols(proto):
    assert parse(with_(lambda r: r["resource"].update({"protocol": proto}))).protocol == proto


@pytest.mark.parametrize("res", [
    {"timeout": 1},                          # == default ping-interval
    {"timeout": 0.5},
    {"ping-interval": 4},                    # == default timeout
    {"ping-interval": 5, "timeout": 5},
])
def test_timeout_must_exceed_ping(res):
    bad(with_(lambda r: r["resource"].update(res)), "timeout must exceed")


@pytest.mark.parametrize("key", ["ping-interval", "timeout", "connect-interval",
                                 "barrier-interval"])
@pytest.mark.parametrize("value", [0, -1, -0.5])
def test_intervals_must_be_positive(key, value):
    bad(with_(lambda r: r["resource"].update({key: value})), f"resource.{key}",
        "must be positive")


@pytest.mark.parametrize("key", ["after-sb-0pri", "after-sb-1pri"])
@pytest.mark.parametrize("value", ["discard-everything", "", "Disconnect"])
def test_bad_after_sb_policy(key, value):
    msg = bad(with_(lambda r: r["resource"].update({key: value})), f"resource.{key}",
              "disconnect", "discard-secondary")
    assert repr(value) in msg


@pytest.mark.parametrize("key", ["after-sb-0pri", "after-sb-1pri"])
@pytest.mark.parametrize("value", config.SB_POLICIES)
def test_all_after_sb_policies_accepted(key, value):
    cfg = parse(with_(lambda r: r["resource"].update({key: value})))
    assert getattr(cfg, key.replace("-", "_")) == value


@pytest.mark.parametrize("rate", ["fast", "-5M", "", "0K", "1Q"])
def test_bad_resync_rate(rate):
    bad(with_(lambda r: r["resource"].update({"resync-rate": rate})), "resource.resync-rate")


@pytest.mark.parametrize("window", [0, 257, -1])
def test_bad_resync_window(window):
    bad(with_(lambda r: r["resource"].update({"resync-window": window})),
        "resync-window must be 1..256")


# -- files -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as ei:
        load(p)
    assert str(ei.value) == f"{p}: no such file"


@pytest.mark.parametrize("text", ["this is not toml", "[resource\nname='x'",
                                  "a = 1\na = 2", "name = "])
def test_non_toml_file(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}: not valid TOML")
    assert "\n" not in msg


def test_file_errors_name_the_path(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[resource]\nname = "r0"\n')
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert str(ei.value).startswith(f"{p}: ")
    assert "shared-secret" in str(ei.value)


def test_binary_file_is_a_config_error(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\xff\xfe\x00\x01binary\x80\x81")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(p))


def test_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load(str(tmp_path))


# -- accessors ---------------------------------------------------------------------------------

def test_node_by_name():
    cfg = parse(base())
    assert cfg.node("alpha") is cfg.nodes["alpha"]
    assert cfg.node("beta").disk == "/dev/vdc"


def test_node_none_uses_hostname(monkeypatch):
    cfg = parse(base(), "/etc/r0.toml")
    monkeypatch.setattr(config.socket, "gethostname", lambda: "beta")
    assert cfg.node(None) is cfg.nodes["beta"]
    monkeypatch.setattr(config.socket, "gethostname", lambda: "gamma")
    with pytest.raises(ConfigError) as ei:
        cfg.node(None)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "/etc/r0.toml" in msg and "[node.gamma]" in msg
    assert "alpha, beta" in msg and "--node" in msg


def test_node_unknown_name():
    with pytest.raises(ConfigError, match=r"no \[node\.delta\] section"):
        parse(base()).node("delta")


def test_peer_of():
    cfg = parse(base())
    assert cfg.peer_of("alpha") is cfg.nodes["beta"]
    assert cfg.peer_of("beta") is cfg.nodes["alpha"]


def test_admin_socket():
    cfg = parse(with_(lambda r: r["resource"].update({"run-dir": "/srv/br"})))
    assert cfg.admin_socket("alpha") == "/srv/br/r0.alpha.sock"
    assert parse(base()).admin_socket("beta") == os.path.join("/run/blockrep", "r0.beta.sock")


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.1:7000", ("10.0.0.1", 7000)),
    ("10.0.0.1", ("10.0.0.1", 10809)),     # bare host: the default port
    (":7000", ("127.0.0.1", 7000)),        # bare port: the default host
    ("127.0.0.1:0", ("127.0.0.1", 0)),     # port 0: any free port (a listener)
    ("[::1]:7000", ("::1", 7000)),
])
def test_parse_address_command_line_form(text, expected):
    """`serve --listen` uses the configuration's parser with defaults."""
    assert parse_address(text, "--listen", default_port=10809, default_host="127.0.0.1",
                         any_port=True) == expected


@pytest.mark.parametrize("text, fragment", [
    ("127.0.0.1:65536", "port out of range"),
    ("127.0.0.1:x", "port is not a number"),
    ("a b:1", "bad host"),
])
def test_parse_address_command_line_errors(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_address(text, "--listen", default_port=10809, default_host="127.0.0.1",
                      any_port=True)


# -- address clashes (caught when the config is read, not as Errno 98 later) --------------------

def loopback_pair(raw):
    raw["node"]["alpha"].update({"address": "127.0.0.1:7789", "nbd": "127.0.0.1:10809"})
    raw["node"]["beta"].update({"address": "127.0.0.1:7790", "nbd": "127.0.0.1:10810"})


def test_loopback_pair_ok():
    cfg = parse(with_(loopback_pair))
    assert cfg.nodes["beta"].nbd == ("127.0.0.1", 10810)


def test_nbd_port_equals_own_replication_port():
    def m(raw):
        raw["node"]["alpha"]["nbd"] = "10.0.0.1:7789"
    bad(with_(m), "node.alpha", "10.0.0.1:7789", "nbd", "replication")


def test_nbd_on_wildcard_clashes_with_own_replication_port():
    def m(raw):
        raw["node"]["beta"]["nbd"] = "0.0.0.0:7789"
    bad(with_(m), "node.beta", "0.0.0.0:7789", "10.0.0.2:7789")


def test_same_nbd_address_on_one_host():
    def m(raw):
        loopback_pair(raw)
        raw["node"]["beta"]["nbd"] = "127.0.0.1:10809"
    bad(with_(m), "alpha", "beta", "127.0.0.1:10809", "nbd")


def test_same_nbd_address_localhost_spelling():
    def m(raw):
        loopback_pair(raw)
        raw["node"]["beta"]["nbd"] = "localhost:10809"
    bad(with_(m), "alpha", "beta", "10809")


def test_nbd_clashes_with_the_other_nodes_replication_port_on_one_host():
    def m(raw):
        loopback_pair(raw)
        raw["node"]["beta"]["nbd"] = "127.0.0.1:7789"
    bad(with_(m), "alpha", "beta", "127.0.0.1:7789")


def test_same_routable_nbd_address_on_two_hosts():
    def m(raw):
        raw["node"]["alpha"]["nbd"] = "10.0.0.9:10809"
        raw["node"]["beta"]["nbd"] = "10.0.0.9:10809"
    bad(with_(m), "10.0.0.9:10809", "alpha", "beta")


def test_same_loopback_nbd_on_two_hosts_ok():
    # alpha and beta run on different machines (10.0.0.1, 10.0.0.2): each serves its own
    # loopback NBD port
    def m(raw):
        raw["node"]["beta"]["nbd"] = "127.0.0.1:10809"
    assert parse(with_(m)).nodes["beta"].nbd == ("127.0.0.1", 10809)


@pytest.mark.parametrize("key", ["ping-interval", "timeout", "connect-interval",
                                 "barrier-interval"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_timers_must_be_finite(key, value):
    bad(with_(lambda r: r["resource"].update({key: value})), f"resource.{key}")


def test_loads_bad_toml_is_one_line():
    with pytest.raises(ConfigError) as ei:
        config.loads(b"[resource\nname=", "x.toml")
    assert "\n" not in str(ei.value) and "x.toml" in str(ei.value)
    with pytest.raises(ConfigError):
        config.loads(b"\xff\xfe", "x.toml")


# -- link security: handshake bounds and TLS --------------------------------------------------

def test_link_security_defaults():
    cfg = parse(base())
    assert (cfg.handshake_timeout, cfg.max_handshakes, cfg.tls) == (5.0, 8, False)
    assert cfg.nodes["alpha"].tls_cert == cfg.nodes["alpha"].tls_fingerprint == ""


def test_handshake_bounds_parsed_and_checked():
    cfg = parse(with_(lambda r: r["resource"].update({"handshake-timeout": 2,
                                                      "max-handshakes": 3})))
    assert (cfg.handshake_timeout, cfg.max_handshakes) == (2.0, 3)
    bad(with_(lambda r: r["resource"].update({"handshake-timeout": 0})),
        "resource.handshake-timeout must be positive")
    bad(with_(lambda r: r["resource"].update({"max-handshakes": 0})),
        "resource.max-handshakes must be 1..1024")
    bad(with_(lambda r: r["resource"].update({"max-handshakes": True})), "max-handshakes",
        "wrong type")


def _tls(r):
    r["resource"].update({"tls": True, "tls-ca": "/etc/ca.crt", "tls-cert": "/etc/d.crt",
                          "tls-key": "/etc/d.key"})
    r["node"]["alpha"].update({"tls-cert": "/etc/a.crt", "tls-key": "/etc/a.key",
                               "tls-fingerprint": "AB:" * 31 + "AB"})


def test_tls_node_values_override_resource_defaults():
    cfg = parse(with_(_tls))
    a, b = cfg.nodes["alpha"], cfg.nodes["beta"]
    assert cfg.tls is True
    assert (a.tls_cert, a.tls_key, a.tls_ca) == ("/etc/a.crt", "/etc/a.key", "/etc/ca.crt")
    assert (b.tls_cert, b.tls_key, b.tls_ca) == ("/etc/d.crt", "/etc/d.key", "/etc/ca.crt")
    assert a.tls_fingerprint == "ab" * 32 and b.tls_fingerprint == ""


def test_tls_needs_files_for_every_node():
    def no_key(r):
        _tls(r)
        del r["resource"]["tls-key"]
    bad(with_(no_key), "tls = true needs tls-key in [node.beta] or [resource]")


@pytest.mark.parametrize("value", ["ab" * 31, "zz" * 32, "ab" * 33, "x"])
def test_tls_fingerprint_must_be_sha256_hex(value):
    bad(with_(lambda r: r["node"]["beta"].update({"tls-fingerprint": value})),
        "node.beta.tls-fingerprint", "64 hex digits")


def test_tls_must_be_a_boolean():
    bad(with_(lambda r: r["resource"].update({"tls": "yes"})), "resource.tls", "wrong type")


# -- fencing and handlers ----------------------------------------------------------------------

def test_fencing_defaults_and_resource_only():
    cfg = parse(base())
    assert cfg.fencing == "dont-care" and cfg.handlers == {} and cfg.fence_peer_timeout == 60
    raw = with_(lambda r: (r["resource"].__setitem__("fencing", "resource-only"),
                           r.__setitem__("handlers", {"fence-peer": "/bin/fence",
                                                      "unfence-peer": "/bin/fence -u",
                                                      "fence-peer-timeout": 5})))
    cfg = parse(raw)
    assert cfg.fencing == "resource-only"
    assert cfg.handlers == {"fence-peer": "/bin/fence", "unfence-peer": "/bin/fence -u"}
    assert cfg.fence_peer_timeout == 5.0


def test_fencing_errors():
    bad(with_(lambda r: r["resource"].__setitem__("fencing", "stonith")),
        "resource.fencing 'stonith'", "dont-care, resource-only")
    bad(with_(lambda r: r["resource"].__setitem__("fencing", "resource-only")),
        "needs handlers.fence-peer")
    bad(with_(lambda r: r.__setitem__("handlers", {"fence-peer": 3})),
        "handlers.fence-peer: wrong type")
    bad(with_(lambda r: r.__setitem__("handlers", {"split-brainz": "x"})),
        "handlers: unknown key 'split-brainz'")
    bad(with_(lambda r: r.__setitem__("handlers", {"fence-peer-timeout": 0})),
        "fence-peer-timeout must be positive")


def test_busy_poll():
    assert parse(base(), "<c>").busy_poll == 0.0
    assert parse(with_(lambda r: r["resource"].update({"busy-poll": 100})), "<c>").busy_poll == 100
    bad(with_(lambda r: r["resource"].update({"busy-poll": -1})), "resource.busy-poll",
        "0-10000 microseconds")
    bad(with_(lambda r: r["resource"].update({"busy-poll": 1e6})), "resource.busy-poll")
    bad(with_(lambda r: r["resource"].update({"busy-poll": "fast"})), "busy-poll")


# -- csums-alg / verify-alg ----------------------------------------------------------------------

def test_digest_algorithms_default():
    cfg = parse(base())
    assert cfg.csums_alg == cfg.verify_alg == "xxh3-128"  # docs/operations.md


def test_csums_after_crash_only_default_true_and_a_boolean():
    assert parse(base()).csums_after_crash_only is True
    cfg = parse(with_(lambda r: r["resource"].update({"csums-after-crash-only": False})))
    assert cfg.csums_after_crash_only is False
    bad(with_(lambda r: r["resource"].update({"csums-after-crash-only": "no"})),
        "resource.csums-after-crash-only", "wrong type")


@pytest.mark.parametrize("alg", ["xxh3-128", "sha256", "blake2b-128", "blake2b-256"])
def test_digest_algorithms_accepted(alg):
    cfg = parse(with_(lambda raw: raw["resource"].update({"csums-alg": alg,
                                                           "verify-alg": alg})))
    assert cfg.csums_alg == cfg.verify_alg == alg


@pytest.mark.parametrize("key", ["csums-alg", "verify-alg"])
@pytest.mark.parametrize("alg, fragment", [
    ("crc32c", "'crc32c' is too weak to decide that a block is in sync"),
    ("md5", "'md5' is too weak"), ("sha1", "'sha1' is too weak"),
    ("xxh64", "unknown digest 'xxh64'"), ("", "unknown digest ''")])
def test_bad_digest_algorithm(key, alg, fragment):
    msg = bad(with_(lambda raw: raw["resource"].update({key: alg})), f"resource.{key}:",
              fragment)
    assert msg.endswith("one of xxh3-128, sha256, blake2b-128, blake2b-256")


def test_digest_algorithm_wrong_type():
    bad(with_(lambda raw: raw["resource"].update({"csums-alg": 128})),
        "resource.csums-alg: wrong type int")
# -- link compression ---------------------------------------------------------------------------

def test_compression_default_and_settings():
    cfg = parse(base())
    assert (cfg.compression, cfg.compression_level) == ("none", 0)
    for text, want in (("lz4", ("lz4", 0)), ("zstd", ("zstd", 3)), ("zstd:9", ("zstd", 9)),
                       ("none", ("none", 0))):
        cfg = parse(with_(lambda r: r["resource"].__setitem__("compression", text)))
        assert (cfg.compression, cfg.compression_level) == want


def test_compression_errors():
    bad(with_(lambda r: r["resource"].__setitem__("compression", "gzip")),
        "resource.compression", "none, lz4 or zstd")
    bad(with_(lambda r: r["resource"].__setitem__("compression", "zstd:40")),
        "resource.compression", "1..22")
    bad(with_(lambda r: r["resource"].__setitem__("compression", 1)),
        "resource.compression: wrong type")


def test_congestion_options():
    cfg = parse(with_(lambda r: r["resource"].update(
        {"sndbuf-size": "2M", "congestion-fill": "1M", "on-congestion": "pull-ahead"})))
    assert (cfg.sndbuf_size, cfg.congestion_fill, cfg.on_congestion) == (2 << 20, 1 << 20,
                                                                        "pull-ahead")
    assert parse(base()).on_congestion == "block" and parse(base()).sndbuf_size == 0
    bad(with_(lambda r: r["resource"].update({"on-congestion": "drop"})),
        "resource.on-congestion", "pull-ahead")
    bad(with_(lambda r: r["resource"].update({"on-congestion": "pull-ahead"})),
        "needs congestion-fill")
    bad(with_(lambda r: r["resource"].update({"sndbuf-size": "lots"})),
        "resource.sndbuf-size", "not a size")


def test_adjust_changes_the_protocol_live_and_refuses_a_rename():
    from blockrep.shell.adjust import plan
    old = parse(base(), "<c>")
    changed, restart = plan(old, parse(with_(lambda r: r["resource"].update(
        {"protocol": "A"})), "<c>"))
    assert changed == {"protocol": ("C", "A")} and restart == []
    _changed, restart = plan(old, parse(with_(lambda r: r["resource"].update(
        {"name": "r1"})), "<c>"))
    assert restart == ["resource.name"]
# -- on-io-error -------------------------------------------------------------------------------

def test_on_io_error_defaults_to_detach_and_takes_pass_on():
    assert parse(base(), "<c>").on_io_error == "detach"
    cfg = parse(with_(lambda r: r["resource"].__setitem__("on-io-error", "pass-on")), "<c>")
    assert cfg.on_io_error == "pass-on"
    bad(with_(lambda r: r["resource"].__setitem__("on-io-error", "panic")),
        "resource.on-io-error", "detach", "pass-on")


# -- the configuration directory: names, common.toml -------------------------------------------

RESOURCE = """
[resource]
name = "{name}"
shared-secret = "x"
{extra}
[node.alpha]
address = "10.0.0.1:7789"
disk = "/dev/vdb"
nbd = "127.0.0.1:10809"

[node.beta]
address = "10.0.0.2:7789"
disk = "/dev/vdc"
nbd = "127.0.0.1:10810"
"""


def test_common_toml_gives_defaults_the_resource_overrides(tmp_path):
    (tmp_path / "common.toml").write_text(
        '[common]\nprotocol = "A"\ntimeout = 9\nc-min-rate = "1M"\n'
        '[common.handlers]\nsplit-brain = "/bin/true"\nout-of-sync = "/bin/true"\n')
    (tmp_path / "r0.toml").write_text(RESOURCE.format(
        name="r0", extra='timeout = 4\n[handlers]\nout-of-sync = "/bin/false"\n'))
    cfg = load(str(tmp_path / "r0.toml"))
    assert cfg.protocol == "A" and cfg.c_min_rate == 1 << 20  # from [common]
    assert cfg.timeout == 4.0  # the resource's own wins
    assert cfg.handlers == {"split-brain": "/bin/true", "out-of-sync": "/bin/false"}


@pytest.mark.parametrize("text,fragment", [
    ('[common]\nname = "x"\n', "common: unknown key 'name'"),
    ('[common]\ntimeout = "soon"\n', "common.timeout: wrong type str"),
    ('[resource]\nname = "x"\n', "unknown section [resource]"),
    ('[common.handlers]\nfence = "/bin/true"\n', "common.handlers: unknown key 'fence'"),
    ('[common\n', "not valid TOML"),
])
def test_bad_common_toml_is_one_clear_error(tmp_path, text, fragment):
    (tmp_path / "common.toml").write_text(text)
    (tmp_path / "r0.toml").write_text(RESOURCE.format(name="r0", extra=""))
    with pytest.raises(ConfigError) as ei:
        load(str(tmp_path / "r0.toml"))
    msg = str(ei.value)
    assert "common.toml" in msg and fragment in msg and "\n" not in msg, msg


def test_resource_names_resolve_in_the_configuration_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKREP_CONFIG_DIR", str(tmp_path))
    (tmp_path / "common.toml").write_text("[common]\n")
    (tmp_path / "r0.toml").write_text(RESOURCE.format(name="r0", extra=""))
    (tmp_path / "web.toml").write_text(RESOURCE.format(name="webdata", extra=""))
    assert config.resolve("r0") == str(tmp_path / "r0.toml")  # NAME.toml
    assert config.resolve("webdata") == str(tmp_path / "web.toml")  # by resource.name
    assert config.resolve("./elsewhere.toml") == "./elsewhere.toml"  # a path as it is
    assert config.resource_files() == [str(tmp_path / "r0.toml"), str(tmp_path / "web.toml")]
    with pytest.raises(ConfigError) as ei:
        config.resolve("nope")
    assert "no resource 'nope' in" in str(ei.value) and "r0, webdata" in str(ei.value)
    monkeypatch.setenv("BLOCKREP_CONFIG_DIR", str(tmp_path / "missing"))
    assert config.resource_files() == []
