"""Config: defaults, YAML, NETBOOT_* environment, flags; errors name file, line, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.config import Config, inventory_dsn, load
from netboot.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netboot.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_embedded_defaults() -> None:
    cfg = load(None, env={})
    assert cfg == Config()
    assert cfg.http.port == 8080
    assert cfg.http.plain_api == "loopback"  # the API over plain HTTP: this host only
    assert cfg.dhcp.mode == "proxy"
    assert cfg.dhcp.port == 67 and cfg.dhcp.pxe_port == 4011
    assert cfg.tftp.port == 69
    assert cfg.tftp.single_port is False  # a port per transfer (RFC 1350 §4)
    assert "/usr/lib/ipxe" in cfg.assets.dirs and "/usr/share/ipxe" in cfg.assets.dirs
    assert str(cfg.db_path) == "/var/lib/netboot/netboot.db"


def test_file_env_and_flags_layer_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 8081\ndhcp:\n  mode: authoritative\n"
                           "  authoritative:\n    pool_start: 192.0.2.100\n"
                           "    pool_end: 192.0.2.150\n")
    cfg = load(path, env={"NETBOOT_HTTP_PORT": "8082", "NETBOOT_TFTP_PORT": "6969"})
    assert cfg.http.port == 8082 and cfg.tftp.port == 6969
    assert cfg.dhcp.authoritative.pool_start == "192.0.2.100"
    cfg = load(path, env={"NETBOOT_HTTP_PORT": "8082"}, flags={"http_port": 9000,
                                                                "interface": ["eth1"]})
    assert cfg.http.port == 9000
    assert cfg.server.interfaces == ("eth1",)


def test_tftp_single_port_from_the_file_or_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "tftp:\n  single_port: true\n")
    assert load(path, env={}).tftp.single_port is True
    assert load(None, env={"NETBOOT_TFTP_SINGLE_PORT": "yes"}).tftp.single_port is True
    assert load(path, env={"NETBOOT_TFTP_SINGLE_PORT": "off"}).tftp.single_port is False


def test_unknown_key_names_file_line_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 8080\n  prot: 9\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    e = err.value
    assert e.source == str(path) and e.line == 3 and e.key == "http.prot"
    assert e.fix is not None and "port" in e.fix
    assert f"{path}:3: http.prot: unknown key" in str(e)


@pytest.mark.parametrize(
    ("text", "key", "line", "fix_word"),
    [
        ("http:\n  port: eighty\n", "http.port", 2, "number"),
        ("dhcp:\n  mode: maybe\n", "dhcp.mode", 2, "proxy"),
        ("dhcp:\n  uefi_option43: perhaps\n", "dhcp.uefi_option43", 2, "true"),
        ("server:\n  advertise: 300.1.1.1\n", "server.advertise", 2, "192.0.2.10"),
        ("http:\n  port: 70000\n", "http.port", 2, "1-65535"),
        ("dhcp:\n  mode: authoritative\n", "dhcp.authoritative", None, "pool_start"),
        ("discovery:\n  policy: auto\n", "discovery.rules", None, "rules"),
        ("discovery:\n  rules:\n    - {selector: {product: X}, role: boss}\n",
         "discovery.rules[0].role", None, None),
        ("server: [1, 2]\n", "server", 1, "key: value"),
        ("http:\n  max_connections: 0\n", "http.max_connections", 2, "worker_connections"),
        ("http:\n  header_timeout: -5\n", "http.header_timeout", 2, ">= 1"),
        ("http:\n  send_threads: -1\n", "http.send_threads", 2, "0 to send on"),
        ("http:\n  send_threads: 65\n", "http.send_threads", 2, "0-64"),
        ("http:\n  max_connections: 100\n  max_connections_per_source: 200\n",
         "http.max_connections_per_source", 3, "raise http.max_connections"),
        ("tftp:\n  max_per_client: 0\n", "tftp.max_per_client", 2, ">= 1"),
        ("enroll:\n  report_burst: 0\n", "enroll.report_burst", 2, ">= 1"),
        ("discovery:\n  burst_all_sources: 0\n", "discovery.burst_all_sources", 2, ">= 1"),
        ("discovery:\n  rate_all_sources: 0\n", "discovery.rate_all_sources", 2, ">= 1"),
        ("enroll:\n  report_rate: 0\n", "enroll.report_rate", 2, ">= 1"),
        ("tftp:\n  ack_spin_us: -1\n", "tftp.ack_spin_us", 2, "0 turns"),
        ("tftp:\n  ack_spin_us: 5000\n", "tftp.ack_spin_us", 2, "0 turns"),
        ("tftp:\n  single_port: sometimes\n", "tftp.single_port", 2, "true or false"),
        ("tftp:\n  max_transfers: 10\n  max_per_client: 11\n", "tftp.max_per_client", 3,
         "raise tftp.max_transfers"),
        ("inventory:\n  events_keep_days: -1\n", "inventory.events_keep_days", 2, "forever"),
        ("inventory:\n  audit_keep: 0\n", "inventory.audit_keep", 2, ">= 1"),
        ("http:\n  plain_api: sometimes\n", "http.plain_api", 2, "loopback"),
        ("http:\n  plain_api: refuse\nhttps:\n  enabled: false\n", "http.plain_api", 2,
         "enable https"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, key: str, line: int | None,
                    fix_word: str | None) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == key
    if line is not None:
        assert err.value.line == line
    if fix_word is not None:
        assert fix_word in (err.value.fix or "") + err.value.message


def test_a_key_given_twice_names_both_lines(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys without a word: a second http: section
    silently dropped the first one's port (s35-user)."""
    path = write(tmp_path, "http:\n  port: 8081\ntftp:\n  port: 6969\nhttp:\n  listen: 127.0.0.1\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.source, err.value.line, err.value.key) == (str(path), 5, "http")
    assert "first on line 1" in err.value.message
    path = write(tmp_path, "tftp:\n  port: 6969\n  mtu: 1400\n  port: 6970\n")
    with pytest.raises(ConfigError, match=r"tftp\.port: given twice") as err:
        load(path, env={})
    assert err.value.line == 4
    # The same key in two sections is no repetition.
    assert load(write(tmp_path, "http:\n  port: 1\ntftp:\n  port: 2\n"), env={}).tftp.port == 2


def test_a_start_up_error_is_located_where_its_key_was_set(tmp_path: Path) -> None:
    """A check at start-up (a port in use, a TLS file, a profile) knows only the key; the
    message names the file and line, variable or flag that set it (s35-user)."""
    from netboot.config import located

    path = write(tmp_path, "server:\n  log_level: info\nhttps:\n  cert_file: /x.pem\n"
                           "  key_file: /x.key\n")
    cfg = load(path, env={"NETBOOT_HTTP_PORT": "8081"}, flags={"tftp_port": 6969})
    got = located(cfg, ConfigError("cannot read /x.pem", key="https.cert_file", fix="check"))
    assert str(got) == f"{path}:4: https.cert_file: cannot read /x.pem (fix: check)"
    got = located(cfg, ConfigError("in use", key="http.port"))
    assert str(got) == "environment variable NETBOOT_HTTP_PORT: http.port: in use"
    assert str(located(cfg, ConfigError("in use", key="tftp.port"))) == \
        "--tftp-port: tftp.port: in use"
    # An embedded default, or an error that knows its source already, is left as it is.
    unset = ConfigError("busy", key="dhcp.port")
    assert located(cfg, unset) is unset
    known = ConfigError("x", source="other.yaml", line=9, key="https.cert_file")
    assert located(cfg, known) is known


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 8080\n bad: [\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.source == str(path)
    assert err.value.line is not None and err.value.line >= 3


def test_env_error_names_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load(None, env={"NETBOOT_HTTP_PORT": "x"})
    assert "NETBOOT_HTTP_PORT" in str(err.value)


def test_flag_error_names_flag() -> None:
    with pytest.raises(ConfigError) as err:
        load(None, env={}, flags={"dhcp_mode": "sideways"})
    assert "--dhcp-mode" in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as err:
        load("/nonexistent/netboot.yaml", env={})
    assert "--config" in (err.value.fix or "")


def test_discovery_rules_become_groups(tmp_path: Path) -> None:
    path = write(tmp_path, "discovery:\n  policy: auto\n  rules:\n"
                           "    - selector: {product: [X, Y]}\n      cluster: line-3\n"
                           "      role: agent\n      hostname_template: 'l3-{mac_suffix}'\n")
    cfg = load(path, env={})
    (rule,) = cfg.discovery.rules
    assert rule.selector == {"product": ("X", "Y")}
    assert rule.cluster == "line-3" and str(rule.role) == "agent"


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from netboot.cli import main

    good = write(tmp_path, "http:\n  port: 8080\n")
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("tftp:\n  enabled: true\n  portt: 69\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: tftp.portt: unknown key" in err and "port" in err


@pytest.mark.parametrize(("text", "line", "key", "problem"), [
    ("enroll:\n  hostname_template: \"{serial}-{rack}\"\n", 2, "enroll.hostname_template",
     "unknown field {rack}"),
    ("enroll:\n  hostname_template: \"{serial\"\n", 2, "enroll.hostname_template",
     "'{serial': expected '}' before end of string"),
    ("discovery:\n  policy: auto\n  rules:\n    - name: a\n      selector: {arch: [arm64]}\n"
     "      cluster: c\n      hostname_template: \"pi-{mac_sufix}\"\n", 7,
     "discovery.rules[0].hostname_template", "unknown field {mac_sufix}"),
])
def test_check_config_refuses_the_hostname_template_serve_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, key: str,
        problem: str) -> None:
    # check-config said "OK" to a template that stopped `netboot serve`.
    from netboot.cli import main

    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"netboot: configuration error: {path}:{line}: {key}: {problem} (fix: use "
        "{mac_suffix}, {mac}, {serial}, {uuid}, {asset}, {cluster}, {role} or {product})\n")


@pytest.mark.parametrize(("text", "line", "message"), [
    ("server:\n  data_dir: /x\ndhcp:\n  mode: authoritative\n", 4,
     "dhcp.authoritative: authoritative mode needs an address pool"),
    ("dhcp:\n  mode: authoritative\n  authoritative:\n    pool_start: 192.0.2.100\n", 3,
     "dhcp.authoritative: authoritative mode needs an address pool"),  # as before: its section
    ("# the lab\ndiscovery:\n  policy: auto\n", 3,
     "discovery.rules: policy 'auto' needs at least one rule"),
])
def test_a_setting_that_needs_a_missing_one_names_its_own_line(
        tmp_path: Path, text: str, line: int, message: str) -> None:
    # The missing setting has no line; these named none (`netboot.yaml: dhcp.authoritative:
    # ...`), where the https pair names the line of the one given (s35-user2).
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert str(err.value).startswith(f"{path}:{line}: {message} (fix: ")


def test_a_rule_trusts_firmware_strings_only_when_told(tmp_path: Path) -> None:
    rules = ("discovery:\n  policy: auto\n  rules:\n"
             "    - {name: a, selector: {product: X}, cluster: c}\n"
             "    - {name: b, selector: {product: Y}, cluster: c, trust_firmware_strings: true}\n")
    cfg = load(write(tmp_path, rules), env={})
    assert [r.name for r in cfg.discovery.rules] == ["a", "b"]
    assert cfg.discovery.trusted_rules == ("b",)


@pytest.mark.parametrize(("text", "key", "says"), [
    ("    - {selector: {product: X}, cluster: c, trust_firmware_strings: 'yes'}\n",
     "discovery.rules[0].trust_firmware_strings", "not true or false"),
    ("    - {name: a, selector: {product: X}, cluster: c}\n"
     "    - {name: a, selector: {product: Y}, cluster: c}\n",
     "discovery.rules[1].name", "second rule named 'a'"),
])
def test_bad_rule_trust_is_a_start_up_error(tmp_path: Path, text: str, key: str,
                                            says: str) -> None:
    path = write(tmp_path, "discovery:\n  policy: auto\n  rules:\n" + text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == key and says in str(err.value)


def test_trusted_rules_are_named_in_the_rule_not_listed(tmp_path: Path) -> None:
    path = write(tmp_path, "discovery:\n  trusted_rules: [a]\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert "trust_firmware_strings" in (err.value.fix or "")


def test_unquoted_mac_in_selector_stays_a_mac(tmp_path: Path) -> None:
    path = write(tmp_path, "discovery:\n  policy: auto\n  rules:\n"
                           "    - {selector: {mac: 52:54:00:00:00:11}, cluster: c}\n"
                           "http:\n  port: 8081\n")
    cfg = load(path, env={})
    assert cfg.discovery.rules[0].selector == {"mac": ("52:54:00:00:00:11",)}
    assert cfg.http.port == 8081


def test_every_error_names_a_key_the_config_has() -> None:
    """A start-up error tells the user which key to fix: that key must exist in the file."""
    import dataclasses
    import re
    import typing

    from netboot import config as config_module

    root = Path(config_module.__file__).parent
    keys = set()
    for path in root.rglob("*.py"):
        keys |= set(re.findall(r'(?:key[_a-z]*|[A-Z_]*KEY)\s*[:=][^=\n]*?"([a-z_]+(?:\.[a-z_]+)*)"',
                               path.read_text(encoding="utf-8")))
    sections = {f.name for f in dataclasses.fields(Config)}
    keys = {k for k in keys if k.split(".")[0] in sections or "." in k}
    # Zone.build parameters that the service does not expose as settings (yet).
    keys -= {"dns.server_name", "dns.k3s_port", "dns.reverse_networks"}
    assert {"server.interfaces", "dhcp.authoritative.pool_start", "tftp.port"} <= keys

    def resolves(dotted: str) -> bool:
        cls: object = Config
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(cls):
                return False
            hints = typing.get_type_hints(cls)
            if part not in hints:
                return False
            cls = hints[part]
        return True

    assert [k for k in sorted(keys) if not resolves(k)] == []



def test_where_each_value_came_from_is_kept_and_a_default_can_be_lowered(
        tmp_path: Path) -> None:
    """``origins`` names where the operator set a value (file and line, variable, flag);
    ``lowered`` lowers only what is still a default and stops at a value that was set,
    naming where (service.raise_fd_limit's rule)."""
    from netboot.config import lowered

    path = write(tmp_path, "http:\n  port: 8081\ntftp:\n  max_transfers: 2000\n")
    cfg = load(path, env={"NETBOOT_HTTP_MAX_CONNECTIONS": "900"}, flags={"tftp_port": 6969})
    assert cfg.origins == {"http": (str(path), 1), "http.port": (str(path), 2),
                           "tftp": (str(path), 3), "tftp.max_transfers": (str(path), 4),
                           "http.max_connections": ("environment variable "
                                                    "NETBOOT_HTTP_MAX_CONNECTIONS", None),
                           "tftp.port": ("--tftp-port", None)}
    assert load(None, env={}).origins == {}
    fitted = lowered(cfg, {"tftp.max_per_client": 10, "tftp.max_transfers": 2000},
                     why="w", fix="f")
    assert fitted.tftp.max_per_client == 10 and fitted.tftp.max_transfers == 2000
    assert fitted.origins == cfg.origins and cfg.tftp.max_per_client == 64
    for key, source, line in (("tftp.max_transfers", str(path), 4),
                              ("http.max_connections",
                               "environment variable NETBOOT_HTTP_MAX_CONNECTIONS", None)):
        with pytest.raises(ConfigError) as err:
            lowered(cfg, {key: 100}, why="too many", fix="lower it")
        assert (err.value.key, err.value.source, err.value.line) == (key, source, line)
        assert err.value.fix == "lower it" and err.value.message == "too many"
    # Not a key of the file, nor of the environment.
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, "origins: {}\n"), env={})
    assert err.value.key == "origins" and err.value.message == "unknown key"
    assert load(None, env={"NETBOOT_ORIGINS_X": "1"}).origins == {}

# --- inventory.backend: postgresql ------------------------------------------------------------

SECRET_DSN = "postgresql://netboot:hunter2-secret@db.example:5432/netboot"


def test_postgresql_dsn_from_file_env_or_dsn_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"inventory:\n  backend: postgresql\n  dsn: {SECRET_DSN}\n")
    cfg = load(path, env={})
    assert inventory_dsn(cfg) == SECRET_DSN
    assert "hunter2" not in repr(cfg) and "hunter2" not in cfg.inventory_name
    assert cfg.inventory_name == "postgresql://netboot:***@db.example:5432/netboot"
    env = load(write(tmp_path, "inventory:\n  backend: postgresql\n"),
               env={"NETBOOT_INVENTORY_DSN": SECRET_DSN})
    assert inventory_dsn(env) == SECRET_DSN
    secret = tmp_path / "dsn"
    secret.write_text(SECRET_DSN + "\n", encoding="utf-8")
    from_file = load(write(tmp_path, f"inventory:\n  backend: postgresql\n  dsn_file: {secret}\n"),
                     env={})
    assert inventory_dsn(from_file) == SECRET_DSN


@pytest.mark.parametrize(
    ("text", "key", "line", "fix_word"),
    [
        ("inventory:\n  backend: postgresql\n", "inventory.backend", 2, "inventory.dsn"),
        ("inventory:\n  backend: mysql\n", "inventory.backend", 2, "postgresql"),
        ("inventory:\n  backend: postgresql\n  dsn: mysql://u:hunter2@h/d\n", "inventory.dsn",
         3, "postgresql://"),
        ("inventory:\n  backend: postgresql\n  dsn: postgresql://u:hunter2@h:port/d\n",
         "inventory.dsn", 3, "port"),
        ("inventory:\n  dsn: postgresql://u:hunter2@h/d\n", "inventory.dsn", 2,
         "backend: postgresql"),
        ("inventory:\n  backend: postgresql\n  path: /x.db\n  dsn: postgresql://h/d\n",
         "inventory.path", 3, "backend: sqlite"),
        ("inventory:\n  backend: postgresql\n  dsn: postgresql://h/d\n  dsn_file: /f\n",
         "inventory.dsn_file", 4, "one of the two"),
        ("inventory:\n  backend: postgresql\n  dsn_file: /nonexistent/dsn\n",
         "inventory.dsn_file", 3, "readable"),
    ],
)
def test_bad_inventory_values_never_show_the_password(
        tmp_path: Path, text: str, key: str, line: int, fix_word: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.key, err.value.line, err.value.source) == (key, line, str(path))
    assert fix_word in f"{err.value.fix} {err.value.message}"
    assert "hunter2" not in str(err.value)


def test_postgresql_peer_settings_reach_the_store_and_its_sockets(tmp_path: Path) -> None:
    """inventory.postgresql: libpq's keepalive settings (seconds), given to the store; each
    becomes a socket option (dsn.PeerSettings), TCP_USER_TIMEOUT in milliseconds."""
    import socket

    from netboot.inventory.dsn import PeerSettings
    from netboot.service import open_store

    assert load(None, env={}).inventory.postgresql == PeerSettings()
    cfg = load(write(tmp_path, "inventory:\n  backend: postgresql\n  dsn: postgresql://h/d\n"
                               "  postgresql:\n    keepalives_idle: 7\n"
                               "    tcp_user_timeout: 30\n"), env={})
    peer = cfg.inventory.postgresql
    assert (peer.keepalives_idle, peer.tcp_user_timeout, peer.keepalives_count) == (7, 30, 5)
    assert (peer.check_interval, peer.check_timeout) == (5, 10)
    assert (peer.statement_timeout, peer.idle_in_transaction_session_timeout) == (60, 30)
    assert open_store(cfg)._peer == peer  # type: ignore[attr-defined]
    options = peer.socket_options()
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 7) in options
    assert (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000) in options
    off = PeerSettings(keepalives=False).socket_options()
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0) in off
    assert not any(o[1] == socket.TCP_KEEPIDLE for o in off)


@pytest.mark.parametrize(("key", "value"), [
    ("keepalives_idle", "0"), ("keepalives_count", "128"), ("tcp_user_timeout", "-1"),
    ("connect_timeout", "0"), ("keepalives_interval", "x"), ("check_interval", "-1"),
    ("check_timeout", "0"), ("statement_timeout", "-1"),
    ("idle_in_transaction_session_timeout", "86401")])
def test_bad_postgresql_peer_settings_name_their_key(tmp_path: Path, key: str,
                                                     value: str) -> None:
    path = write(tmp_path, f"inventory:\n  postgresql:\n    {key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.key, err.value.line) == (f"inventory.postgresql.{key}", 3)


def test_postgresql_peer_settings_from_the_environment_name_their_variable(
        tmp_path: Path) -> None:
    """inventory.postgresql.* as NETBOOT_INVENTORY_POSTGRESQL_<KEY>, a level below the
    section, as every other key has its variable (and dhcp.authoritative.*, the other
    section within a section); over the file, named as the origin; a bad value is refused
    naming the variable and the key. (Before: each was refused as an unknown key
    "inventory.postgresql_check_interval".)"""
    path = write(tmp_path, "inventory:\n  postgresql:\n    check_timeout: 4\n"
                           "    keepalives_idle: 9\n")
    cfg = load(path, env={"NETBOOT_INVENTORY_POSTGRESQL_CHECK_TIMEOUT": "3",
                          "NETBOOT_INVENTORY_POSTGRESQL_TCP_USER_TIMEOUT": "20",
                          "NETBOOT_INVENTORY_POSTGRESQL_KEEPALIVES": "false",
                          "NETBOOT_DHCP_AUTHORITATIVE_POOL_START": "192.0.2.50"})
    peer = cfg.inventory.postgresql
    assert (peer.check_timeout, peer.tcp_user_timeout, peer.keepalives,
            peer.keepalives_idle) == (3, 20, False, 9)
    assert cfg.dhcp.authoritative.pool_start == "192.0.2.50"
    assert cfg.origins["inventory.postgresql.check_timeout"] == (
        "environment variable NETBOOT_INVENTORY_POSTGRESQL_CHECK_TIMEOUT", None)
    for var, value, key in (
            ("NETBOOT_INVENTORY_POSTGRESQL_CHECK_TIMEOUT", "0", "check_timeout"),
            ("NETBOOT_INVENTORY_POSTGRESQL_KEEPALIVES_IDLE", "soon", "keepalives_idle"),
            ("NETBOOT_INVENTORY_POSTGRESQL_CHECK_INTERVALS", "5", "check_intervals")):
        with pytest.raises(ConfigError) as err:
            load(path, env={var: value})
        assert err.value.key == f"inventory.postgresql.{key}", err.value
        assert err.value.source == f"environment variable {var}", err.value


def test_bad_dsn_in_env_or_file_names_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, "inventory:\n  backend: postgresql\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={"NETBOOT_INVENTORY_DSN": "http://u:hunter2@h/d"})
    assert "NETBOOT_INVENTORY_DSN" in str(err.value) and "hunter2" not in str(err.value)
    secret = tmp_path / "dsn"
    secret.write_text("u:hunter2@h/d", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, f"inventory:\n  backend: postgresql\n  dsn_file: {secret}\n"),
             env={})
    assert str(secret) in str(err.value) and "hunter2" not in str(err.value)
    assert err.value.key == "inventory.dsn_file" and err.value.line == 3


@pytest.mark.parametrize(("section", "key", "good", "bad"), [
    ("dhcp", "relay_networks", ("198.51.100.0/24", "192.0.2.7"), "2001:db8::/64"),
    ("dns", "forward_networks", ("198.51.100.0/24", "2001:db8::/64"), "198.51.100.0/33"),
])
def test_relay_and_dns_forward_networks_are_networks(
        tmp_path: Path, section: str, key: str, good: tuple[str, ...], bad: str) -> None:
    """dhcp.relay_networks IPv4 (giaddr is one), dns.forward_networks either family."""
    cfg = load(write(tmp_path, f"{section}:\n  {key}: [{', '.join(good)}]\n"), env={})
    assert getattr(getattr(cfg, section), key) == good
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, f"{section}:\n  {key}: [{bad}]\n"), env={})
    assert err.value.key == f"{section}.{key}" and err.value.line == 2
    assert "198.51.100.0/24" in (err.value.fix or "")


def test_a_file_not_in_utf8_names_its_line_and_the_fix(tmp_path: Path) -> None:
    # A Latin-1 comment (an editor's default) on line 3, and a file saved as UTF-16: each a
    # configuration error naming the file, the line and how to fix it, as a YAML error is,
    # not a UnicodeDecodeError's traceback out of check-config and serve.
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("http:\n  port: 8080\n# caf\u00e9 VLAN\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load(latin1, env={})
    assert (err.value.source, err.value.line) == (str(latin1), 3)
    assert str(err.value) == (f"{latin1}:3: byte 0xe9 is not UTF-8 "
                              "(fix: save the file as UTF-8 (iconv -t UTF-8))")
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes("http:\n  port: 8080\n".encode("utf-16"))
    with pytest.raises(ConfigError) as err:
        load(utf16, env={})
    assert (err.value.line, err.value.message) == (1, "is UTF-16 (its byte-order mark), not UTF-8")
    # UTF-8 with a byte-order mark is UTF-8.
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffhttp:\n  port: 8081\n".encode())
    assert load(bom, env={}).http.port == 8081


@pytest.mark.parametrize(("text", "line", "key"), [
    ("discovery:\n  policy: hold\n  rules:\n    - select: {arch: x86_64}\n", 4,
     "discovery.rules[0].select"),
    ("discovery:\n  rules:\n    - selector: {arch: x86_64}\n      role: master\n", 4,
     "discovery.rules[0].role"),
    ("discovery:\n  rules:\n    - selector: [x86_64]\n", 3, "discovery.rules[0].selector"),
    ("http:\n  public_url: ftp://boot.example/\n", 2, "http.public_url"),
])
def test_every_broken_setting_stops_start_up_with_its_line_and_a_fix(
        tmp_path: Path, text: str, line: int, key: str) -> None:
    # A discovery rule's mistakes and an http.public_url of another scheme named the line
    # and the key but no fix, where every other setting's error says what to write.
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.source, err.value.line, err.value.key) == (str(path), line, key)
    assert err.value.fix, str(err.value)
    if key.startswith("discovery"):
        assert "trust_firmware_strings" in err.value.fix


def test_dns_rate_limit_is_on_by_default_and_its_bounds_name_the_line(tmp_path: Path) -> None:
    """dns.rate_limit: on, 10,000 identical answers a second per client network (above what
    a storm asks: README), slip 1, BIND's window and prefixes; a value out of its bounds
    stops start-up at its line with the fix."""
    rrl = load(write(tmp_path, "dns:\n  enabled: true\n"), env={}).dns.rate_limit
    assert (rrl.enabled, rrl.responses_per_second, rrl.nxdomains_per_second,
            rrl.errors_per_second, rrl.window, rrl.slip, rrl.ipv4_prefix_length,
            rrl.ipv6_prefix_length) == (True, 10_000, 10_000, 10_000, 15, 1, 24, 56)
    cfg = load(write(tmp_path, "dns:\n  rate_limit:\n    enabled: false\n    slip: 2\n"),
               env={})
    assert not cfg.dns.rate_limit.enabled and cfg.dns.rate_limit.slip == 2
    for key, value, line in (("slip", 11, 4), ("window", 0, 4), ("ipv6_prefix_length", 129, 4),
                             ("responses_per_second", -1, 4)):
        with pytest.raises(ConfigError) as err:
            load(write(tmp_path, f"dns:\n  enabled: true\n  rate_limit:\n    {key}: {value}\n"),
                 env={})
        assert err.value.key == f"dns.rate_limit.{key}" and err.value.line == line
        assert err.value.fix
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, "dns:\n  rate_limit:\n    per_second: 5\n"), env={})
    assert err.value.key == "dns.rate_limit.per_second" and "did you mean" in (err.value.fix or "")


def test_dns_rate_limit_all_per_second_nodata_and_exempt_clients(tmp_path: Path) -> None:
    """BIND's all-per-second (0: off, its default), nodata-per-second and exempt-clients; a
    bad exempt network stops start-up at its line, with the fix."""
    rrl = load(write(tmp_path, "dns:\n  enabled: true\n"), env={}).dns.rate_limit
    assert (rrl.all_per_second, rrl.nodata_per_second, rrl.exempt_clients) == (0, 10_000, ())
    rrl = load(write(tmp_path, "dns:\n  rate_limit:\n    all_per_second: 50000\n"
                     "    exempt_clients: [192.0.2.53, 198.51.100.0/24, '2001:db8::/56']\n"),
               env={}).dns.rate_limit
    assert rrl.all_per_second == 50_000
    assert rrl.exempt_clients == ("192.0.2.53", "198.51.100.0/24", "2001:db8::/56")
    for text, line in (("[192.0.2.0/33]", 4), ("[resolver.lan]", 4)):
        with pytest.raises(ConfigError) as err:
            load(write(tmp_path, f"dns:\n  enabled: true\n  rate_limit:\n"
                       f"    exempt_clients: {text}\n"), env={})
        assert err.value.key == "dns.rate_limit.exempt_clients" and err.value.line == line
        assert "is not an IP network" in str(err.value) and "198.51.100.0/24" in (err.value.fix
                                                                                  or "")
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, "dns:\n  rate_limit:\n    all_per_second: -1\n"), env={})
    assert err.value.key == "dns.rate_limit.all_per_second" and err.value.line == 3


def test_dhcp_ping_check_is_on_unless_turned_off(tmp_path: Path) -> None:
    """dhcp.ping_check (authoritative mode pings an address before its first offer) is on by
    default, as dnsmasq's (--no-ping turns it off); a value that is not true or false stops
    start-up naming the file, the line and the fix."""
    assert load(None, env={}).dhcp.ping_check is True
    assert load(write(tmp_path, "dhcp:\n  ping_check: false\n"), env={}).dhcp.ping_check \
        is False
    path = write(tmp_path, "dhcp:\n  mode: proxy\n  ping_check: sometimes\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.key, err.value.line, err.value.fix) == (
        "dhcp.ping_check", 3, "write true or false")
    assert f"{path}:3: dhcp.ping_check: expected true or false" in str(err.value)


def test_dhcp_ping_timeout_is_a_second_unless_set_within_bounds(tmp_path: Path) -> None:
    """dhcp.ping_timeout_ms: how long the ping before a first offer waits (ISC dhcpd's
    ping-timeout), 1000 by default; one outside 10-5000 (or not a number) stops start-up
    naming the file, the line and the fix."""
    assert load(None, env={}).dhcp.ping_timeout_ms == 1000
    assert load(write(tmp_path, "dhcp:\n  ping_timeout_ms: 250\n"),
                env={}).dhcp.ping_timeout_ms == 250
    for bad in ("0", "9", "5001", "-1"):
        path = write(tmp_path, f"dhcp:\n  mode: proxy\n  ping_timeout_ms: {bad}\n")
        with pytest.raises(ConfigError) as err:
            load(path, env={})
        assert (err.value.key, err.value.line) == ("dhcp.ping_timeout_ms", 3), bad
        assert f"{path}:3: dhcp.ping_timeout_ms: {bad} is outside 10-5000" in str(err.value)
        assert "write milliseconds, e.g. 1000" in (err.value.fix or "")
    path = write(tmp_path, "dhcp:\n  ping_timeout_ms: 1s\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert (err.value.key, err.value.line) == ("dhcp.ping_timeout_ms", 2)


def test_server_peers_are_base_urls_named_with_their_line(tmp_path: Path) -> None:
    """server.peers: the other servers a device's register command tries (s48-ha). A value
    that is no server's base URL (a path, no host, another scheme, a shell character) stops
    the start with the file, the line and the fix; an empty list (the default) leaves them
    to the inventory's record."""
    path = write(tmp_path, "server:\n  peers:\n    - http://192.0.2.11:8080\n"
                           "    - https://boot-b.example/\n")
    assert load(path, env={}).server.peers == ("http://192.0.2.11:8080",
                                               "https://boot-b.example/")
    assert load(None, env={}).server.peers == ()
    for bad in ("192.0.2.11:8080", "ftp://192.0.2.11", "http://192.0.2.11:8080/api",
                "http://:8080", "http://192.0.2.11:99999", "http://a$(reboot):8080",
                "http://u@192.0.2.11"):
        path = write(tmp_path, f"server:\n  peers: [http://192.0.2.12, '{bad}']\n")
        with pytest.raises(ConfigError) as err:
            load(path, env={})
        assert (err.value.source, err.value.line, err.value.key) == (
            str(path), 2, "server.peers"), (bad, err.value)
        assert bad in err.value.message and "http://HOST:PORT" in (err.value.fix or "")


def test_server_peers_naming_the_loopback_are_refused_unless_this_server_is_there_too(
        tmp_path: Path) -> None:
    """server.peers is given to devices (their register command, their install script's
    fallback): a loopback URL (or one naming no host) has each device try itself. Refused
    with the file, the line and the fix, as the inventory's record leaves such URLs out;
    kept where this server's own base URL is on the loopback too (every server on one host,
    as tests run them: s48-ha's register test), which devices on that host reach (s50-ha)."""
    for bad in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080",
                "http://0.0.0.0:8080", "http://127.0.0.2"):
        for own in ("", "  advertise: 192.0.2.10\n",
                    "http:\n  public_url: http://boot-a.example\n"):
            server = f"server:\n  peers: [http://192.0.2.12, '{bad}']\n"
            path = write(tmp_path, server + own)
            with pytest.raises(ConfigError) as err:
                load(path, env={})
            assert (err.value.source, err.value.line, err.value.key) == (
                str(path), 2, "server.peers"), (bad, own, err.value)
            assert bad in err.value.message and "a device can reach" in err.value.message
            assert "provisioning address" in (err.value.fix or "")
    for own in ("server:\n  advertise: 127.0.0.1\n  peers: [http://127.0.0.1:8080]\n",
                "server:\n  peers: [http://127.0.0.1:8080]\n"
                "http:\n  public_url: http://127.0.0.1:8081\n"):
        assert load(write(tmp_path, own), env={}).server.peers == ("http://127.0.0.1:8080",)
