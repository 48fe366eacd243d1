"""A managed cluster's k3s server CA and secure join token (netboot.pki, k3s_server_ca; README
"What a host on the provisioning network can take").

k3s's secure token ``K10<CA hash>::<user>:<password>`` makes a joining node compare the hash
of the server's ``/cacerts`` with the token's before it sends anything (k3s
pkg/clientaccess/token.go). netboot makes the CA, writes it to server nodes before k3s first
starts (k3s uses CA files it finds in ``server/tls/``), and mints every node's token in the
secure form. These tests compute the hash as k3s does, from the bytes a server's config
writes to the file ``/cacerts`` serves."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from netboot.config import load
from netboot.core import token_secret
from netboot.errors import StoreError
from netboot.inventory.base import Batch
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Cluster
from netboot.pki import K3S_SERVER_CA, K3S_SERVER_CA_KEY, k3s_server_ca
from netboot.sealing import Sealer
from netboot.service import build
from netboot.shipped import templates_dir
from tests.conftest import (
    Env,
    EnvFactory,
    FrontTestServer,
    boot,
    call,
    install_token,
    write_config,
)

S0, S1 = "52:54:00:37:00:01", "52:54:00:37:00:02"
AGENT = "52:54:00:37:00:10"
K3S_CONFIG_FILE = "/etc/rancher/k3s/config.yaml"
CLOUD_INIT = {"name": "ubuntu", "kernel": "vmlinuz", "initrds": ["initrd.img"],
              "config_template": "cloud-init"}


# --- k3s's side, as its source computes it -------------------------------------------------


def k3s_hash_ca(bundle: bytes) -> str:
    """pkg/clientaccess/token.go hashCA: a bundle of one certificate is hashed as the literal
    bytes served; of more, as the DER of the first one's root (certificates without an
    authority key id, or whose AKI is their SKI, are the roots)."""
    from cryptography import x509

    certs = x509.load_pem_x509_certificates(bundle)
    if len(certs) > 1:
        for cert in certs[1:]:
            try:
                aki = cert.extensions.get_extension_for_class(
                    x509.AuthorityKeyIdentifier).value.key_identifier
            except x509.ExtensionNotFound:
                aki = None
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            if not aki or aki == ski:
                bundle = cert.public_bytes(serialization_der())
    return hashlib.sha256(bundle).hexdigest()


def serialization_der() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.DER


def k3s_parse_token(token: str) -> tuple[str, str, str]:
    """pkg/clientaccess/token.go parseToken: (CA hash, username, password)."""
    assert token.startswith("K10"), token
    ca_hash, sep, creds = token[3:].partition("::")
    assert sep and len(ca_hash) == 64, token  # "invalid token CA hash length"
    user, sep, password = creds.partition(":")
    assert sep and password, token  # "invalid token format"
    return ca_hash, user, password


def k3s_users(server: dict[str, Any]) -> dict[str, tuple[str, frozenset[str]]]:
    """The passwd a k3s server writes from its config (pkg/daemons/control/deps, genUsers):
    user -> (password, groups). "server" has the token's password (NormalizeToken); "node"
    the agent-token as given (getNodePass), the server's password where none is given.
    ``server``: a server's k3OS config or its cloud-init user-data (k3s's config file)."""
    files = written(server)
    k3s_file = files.get(K3S_CONFIG_FILE)
    k3s_config = yaml.safe_load(k3s_file["content"]) if k3s_file else {}
    token = server["k3os"]["token"] if "k3os" in server else k3s_config["token"]
    password = k3s_parse_token(token)[2] if token.startswith("K10") else token
    agent = k3s_config.get("agent-token") or password
    # The server token joins servers and agents; the agent token agents only (the docs'
    # "Token Types"; router.go: /v1-k3s/server-bootstrap wants the k3s:server role).
    return {"server": (password, frozenset({"k3s:server", "k3s:agent"})),
            "node": (agent, frozenset({"k3s:agent"}))}


def k3s_joins(users: dict[str, tuple[str, frozenset[str]]], token: str, role: str,
              served_ca: bytes | None = None) -> bool:
    """Whether a node of ``role`` given ``token`` joins the server whose passwd is ``users``
    (pkg/clientaccess ParseAndValidateTokenForUser: the token's own user, else "server" for
    a server's join, "node" for an agent's; a secure token's hash must be the served CA's;
    then basic auth, and the role the endpoint wants)."""
    user = "server" if role == "server" else "node"
    password = token
    if token.startswith("K10"):
        ca_hash, user, password = k3s_parse_token(token)
        if served_ca is not None and ca_hash != k3s_hash_ca(served_ca):
            return False
    known = users.get(user)
    return known is not None and known[0] == password and f"k3s:{role}" in known[1]


def written(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A config's write_files by path."""
    return {f["path"]: f for f in config.get("write_files") or ()}


# --- through the service ------------------------------------------------------------------


def hexhyp(mac: str) -> str:
    return mac.replace(":", "-")


async def managed(env: Env, *, body: dict[str, Any] | None = None) -> None:
    """Cluster ``edge`` (managed, made through the API as an operator makes it), S0 and S1
    its servers, AGENT its agent."""
    await env.post("/api/v1/clusters", {"name": "edge", "server_url": "managed",
                                        **(body or {})}, status=201)
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                        "initrds": ["initrd.img"]}, status=201)
    for mac, name, role in ((S0, "s0", "server"), (S1, "s1", "server"),
                            (AGENT, "a0", "agent")):
        await env.post("/api/v1/machines", {"mac": mac, "hostname": name, "cluster": "edge",
                                            "role": role, "profile": "k3os"}, status=201)


async def k3os_config(env: Env, mac: str) -> tuple[str, dict[str, Any]]:
    token = install_token(await boot(env, mac))
    r = await call(env, "GET", f"/config/{hexhyp(mac)}?token={token}", admin=False)
    assert r.status == 200, (r.status, r.text)
    return token, yaml.safe_load(r.text)


async def registered(env: Env, mac: str, token: str, address: str) -> None:
    r = await call(env, "POST", "/api/v1/register", admin=False, json_body={
        "mac": mac, "token": token, "hostname": "x", "addresses": [address]})
    assert r.status == 200, (r.status, r.text)


async def test_the_token_names_the_hash_k3s_computes_of_what_the_servers_cacerts_serve(
        env: Env) -> None:
    await managed(env)
    token, first = await k3os_config(env, S0)
    files = written(first)
    # What k3s's /cacerts serves: os.ReadFile of server/tls/server-ca.crt (router.go), the
    # bytes k3OS's write_files put there.
    served = files[K3S_SERVER_CA]["content"].encode()
    ca_hash, user, password = k3s_parse_token(first["k3os"]["token"])
    assert ca_hash == k3s_hash_ca(served) == hashlib.sha256(served).hexdigest()
    assert user == "server" and len(password) == 64
    assert files[K3S_SERVER_CA]["permissions"] == "0644"
    assert files[K3S_SERVER_CA_KEY]["permissions"] == "0600"
    assert "PRIVATE KEY" in files[K3S_SERVER_CA_KEY]["content"]
    assert "--cluster-init" in first["k3os"]["k3s_args"]
    # The second server joins it with the same token and writes the same bytes (k3s leaves
    # files identical to its datastore's alone: pkg/cluster isNewerFile).
    await registered(env, S0, token, "192.0.2.21")
    _, second = await k3os_config(env, S1)
    assert second["k3os"]["token"] == first["k3os"]["token"]
    assert written(second)[K3S_SERVER_CA] == files[K3S_SERVER_CA]
    assert written(second)[K3S_SERVER_CA_KEY] == files[K3S_SERVER_CA_KEY]
    # Both servers accept the same agent token (k3s wants it on every server), from k3s's
    # own config file, which only root reads.
    assert written(second)[K3S_CONFIG_FILE] == files[K3S_CONFIG_FILE]
    assert files[K3S_CONFIG_FILE]["permissions"] == "0600"
    users = k3s_users(first)
    assert k3s_joins(users, second["k3os"]["token"], "server", served)
    # An agent: its own secure token (the same CA's hash, user "node"), which the servers
    # take for an agent's join, not a server's; no CA file, no k3s config file.
    _, agent = await k3os_config(env, AGENT)
    agent_token = agent["k3os"]["token"]
    assert k3s_parse_token(agent_token)[:2] == (ca_hash, "node")
    assert k3s_joins(users, agent_token, "agent", served)
    assert not k3s_joins(users, agent_token, "server", served)
    assert password not in str(agent)
    assert not any("rancher" in path for path in written(agent))
    # The API names the CA by that hash, never the CA's key or the token.
    shown = await env.get("/api/v1/clusters/edge")
    assert shown["ca_hash"] == ca_hash
    assert not {"token", "ca_cert", "ca_key", "agent_token"} & set(shown)


async def test_without_https_a_servers_config_writes_the_ca_alone(
        tmp_path: Path, aiohttp_client: Any) -> None:
    """k3OS's write_files then holds only the k3s CA and k3s's config file (no netboot CA
    before them)."""
    cfg = load(write_config(tmp_path, https="  enabled: false\n"), env={})
    service = await build(cfg)
    try:
        client = await aiohttp_client(FrontTestServer(service))
        env = Env(service, client, (cfg.data_dir / "admin.token").read_text().strip())
        await managed(env)
        _, config = await k3os_config(env, S0)
        assert set(written(config)) == {K3S_SERVER_CA, K3S_SERVER_CA_KEY, K3S_CONFIG_FILE}
        served = written(config)[K3S_SERVER_CA]["content"].encode()
        assert k3s_parse_token(config["k3os"]["token"])[0] == k3s_hash_ca(served)
    finally:
        await service.boot.drain()
        service.content.close()
        await service.store.close()


async def test_cloud_init_user_data_writes_the_ca_for_servers_only(env: Env) -> None:
    await env.post("/api/v1/clusters", {"name": "edge", "server_url": "managed"}, status=201)
    await env.post("/api/v1/profiles", CLOUD_INIT, status=201)
    for mac, role in ((S0, "server"), (AGENT, "agent")):
        await env.post("/api/v1/machines", {"mac": mac, "cluster": "edge", "role": role,
                                            "profile": "ubuntu"}, status=201)
    users = {}
    for mac in (S0, AGENT):
        token = install_token(await boot(env, mac))
        r = await call(env, "GET", f"/nocloud/{hexhyp(mac)}/{token}/user-data", admin=False)
        assert r.status == 200, (r.status, r.text)
        users[mac] = yaml.safe_load(r.text)
        if mac == S0:  # the cluster's endpoint, for its agent
            await registered(env, S0, token, "192.0.2.21")
    server, agent = written(users[S0]), written(users[AGENT])
    k3s_config = yaml.safe_load(server["/etc/rancher/k3s/config.yaml"]["content"])
    served = server[K3S_SERVER_CA]["content"].encode()
    assert k3s_parse_token(k3s_config["token"])[0] == k3s_hash_ca(served)
    assert server[K3S_SERVER_CA_KEY]["permissions"] == "0600"
    # An agent writes its k3s config (and the register command's per-boot files:
    # s37-register), never the cluster's CA.
    assert "/etc/rancher/k3s/config.yaml" in agent
    assert not {K3S_SERVER_CA, K3S_SERVER_CA_KEY} & set(agent)
    assert not any(path.startswith("/var/lib/rancher/k3s/server/") for path in agent)
    # Its token joins agents, not servers; the servers' agent-token is its secret.
    agent_token = yaml.safe_load(agent[K3S_CONFIG_FILE]["content"])["token"]
    assert "agent-token" not in agent[K3S_CONFIG_FILE]["content"]
    passwd = k3s_users(users[S0])
    assert k3s_joins(passwd, agent_token, "agent", served)
    assert not k3s_joins(passwd, agent_token, "server", served)
    assert k3s_joins(passwd, k3s_config["token"], "server", served)
    assert k3s_parse_token(agent_token)[2] == k3s_config["agent-token"]
    # cloud-init writes files (init stage) before runcmd installs and starts k3s.
    assert list(users[S0]).index("write_files") < list(users[S0]).index("runcmd")


@pytest.mark.requires("openssl", "openssl")
def test_the_ca_is_what_k3s_signs_with(tmp_path: Path) -> None:
    """CA:TRUE and certificate signing (k8s certutil's NewSelfSignedCACert's usages), an RSA
    key in the PKCS#1 form k3s writes its own, and a certificate signed with it as k3s signs
    its serving certificates verifies against it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    cert_pem, key_pem = k3s_server_ca()
    (tmp_path / "server-ca.crt").write_text(cert_pem)
    (tmp_path / "server-ca.key").write_text(key_pem)

    def openssl(*args: str) -> str:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    text = openssl("x509", "-in", str(tmp_path / "server-ca.crt"), "-noout", "-text")
    assert "CA:TRUE" in text and "Certificate Sign" in text
    assert "Digital Signature" in text and "Key Encipherment" in text
    assert "Public-Key: (2048 bit)" in text and "k3s-server-ca@" in text
    assert key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert "RSA key ok" in openssl("rsa", "-in", str(tmp_path / "server-ca.key"), "-check",
                                   "-noout")
    assert openssl("x509", "-in", str(tmp_path / "server-ca.crt"), "-noout", "-modulus") == \
        openssl("rsa", "-in", str(tmp_path / "server-ca.key"), "-noout", "-modulus")
    # Signed as k3s signs kube-apiserver's certificate (deps.go createClientCertKey).
    ca = x509.load_pem_x509_certificate(cert_pem.encode())
    ca_key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "leaf.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    assert "OK" in openssl("verify", "-CAfile", str(tmp_path / "server-ca.crt"),
                           str(tmp_path / "leaf.crt"))


async def test_the_ca_key_and_the_agent_token_are_sealed_at_rest(tmp_path: Path) -> None:
    sealer = Sealer.generate()
    path = tmp_path / "inventory.db"
    store = SqliteStore(path, sealer=sealer)
    await store.open()
    cert, key = k3s_server_ca()
    agent = "K10" + "0" * 64 + "::node:" + "a" * 64
    await store.put_cluster(Cluster(name="edge", token="K10" + "0" * 64 + "::server:s",
                                    ca_cert=cert, ca_key=key, agent_token=agent), create=True)
    assert (await store.get_cluster("edge")) == Cluster(
        name="edge", token="K10" + "0" * 64 + "::server:s", ca_cert=cert, ca_key=key,
        agent_token=agent)
    await store.close()
    import sqlite3

    (data,) = sqlite3.connect(path).execute(
        "SELECT data FROM clusters WHERE name = 'edge'").fetchone()
    assert "PRIVATE KEY" not in data and key.splitlines()[1] not in data
    assert '"ca_key": "nbs1:' in data or '"ca_key":"nbs1:' in data
    assert "a" * 64 not in data
    assert '"agent_token": "nbs1:' in data or '"agent_token":"nbs1:' in data
    assert cert.splitlines()[1] in data  # the certificate is public
    assert "ca_key" not in repr(Cluster(name="edge", ca_key=key))
    assert "a" * 64 not in repr(Cluster(name="edge", agent_token=agent))


async def test_render_and_the_dashboards_view_withhold_the_ca_key(env: Env) -> None:
    await managed(env)
    cluster = await env.service.store.get_cluster("edge")
    assert cluster is not None and cluster.ca_key
    key_line = cluster.ca_key.splitlines()[1]
    for kind in ("config", "nocloud"):
        # The dashboard shows a machine's render through this route.
        text = await env.get(f"/api/v1/machines/{hexhyp(S0)}/render/{kind}")
        assert key_line not in text and "K3S-CA-KEY" in text, text
        assert cluster.ca_cert.splitlines()[1] in text
        assert cluster.token not in text
        # Nor the agent token's secret, which a server's config gives k3s (agent-token).
        assert k3s_parse_token(cluster.agent_token)[2] not in text and "agent-token" in text
    for listed in (await env.get("/api/v1/clusters"), [await env.get("/api/v1/clusters/edge")]):
        assert all("ca_key" not in c and "token" not in c for c in listed)
    # (``netboot render``, the CLI, prints what the same core call gives.)


async def test_a_cluster_made_before_keeps_its_short_token_until_its_operator_opts_in(
        env: Env) -> None:
    # As an inventory written before netboot made CAs holds it.
    await env.service.store.put_cluster(Cluster(name="edge", token="s" * 64), create=True)
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                        "initrds": ["initrd.img"]}, status=201)
    for mac, role in ((S0, "server"), (AGENT, "agent")):
        await env.post("/api/v1/machines", {"mac": mac, "cluster": "edge", "role": role,
                                            "profile": "k3os"}, status=201)
    assert (await env.get("/api/v1/clusters/edge"))["ca_hash"] is None
    # An edit (the CLI's `clusters set` sends back what it read) changes nothing of it.
    shown = await env.get("/api/v1/clusters/edge")
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body={**shown, "endpoint": None})
    assert r.status == 200, r.text
    # ... but give it an agent token: none of its nodes has its config (a server that has
    # would refuse agents given one).
    edited = await env.service.store.get_cluster("edge")
    assert edited is not None and len(edited.agent_token) == 64
    assert edited == Cluster(name="edge", token="s" * 64, agent_token=edited.agent_token)
    # Opting in while no node has its config: the same secret, now in the secure form.
    r = await call(env, "POST", "/api/v1/clusters/edge/secure-token")
    assert r.status == 200, r.text
    assert r.json()["ca_hash"] and "ca_key" not in r.text
    cluster = await env.service.store.get_cluster("edge")
    assert cluster is not None and cluster.ca_cert and cluster.ca_key
    assert k3s_parse_token(cluster.token) == (k3s_hash_ca(cluster.ca_cert.encode()), "server",
                                              "s" * 64)
    assert k3s_parse_token(cluster.agent_token) == (k3s_hash_ca(cluster.ca_cert.encode()),
                                                    "node", edited.agent_token)
    _, config = await k3os_config(env, S0)
    assert config["k3os"]["token"] == cluster.token
    assert written(config)[K3S_SERVER_CA]["content"] == cluster.ca_cert
    # Asked again, or the cluster edited: the CA is kept (its servers run on it).
    r = await call(env, "POST", "/api/v1/clusters/edge/secure-token")
    assert r.status == 200 and await env.service.store.get_cluster("edge") == cluster
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body={"name": "edge"})
    assert r.status == 200 and await env.service.store.get_cluster("edge") == cluster
    # A new secret is wrapped with the same CA's hash (S0 has its config: by force only).
    r = await call(env, "PUT", "/api/v1/clusters/edge",
                   json_body={"name": "edge", "token": "K10x::server:y"})
    assert r.status == 409 and r.json()["field"] == "token", r.text
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true",
                   json_body={"name": "edge", "token": "K10x::server:y"})
    assert r.status == 200
    again = await env.service.store.get_cluster("edge")
    assert again is not None and again.ca_key == cluster.ca_key
    assert k3s_parse_token(again.token) == (k3s_hash_ca(cluster.ca_cert.encode()), "server",
                                            "K10x::server:y")


async def test_opting_in_is_refused_once_a_server_made_its_own_ca(env: Env) -> None:
    await env.service.store.put_cluster(Cluster(name="edge", token="s" * 64), create=True)
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                        "initrds": ["initrd.img"]}, status=201)
    await env.post("/api/v1/machines", {"mac": S0, "cluster": "edge", "role": "server",
                                        "profile": "k3os"}, status=201)
    _, config = await k3os_config(env, S0)  # its k3s will make a CA of its own
    assert config["k3os"]["token"] == "s" * 64 and K3S_SERVER_CA not in written(config)
    r = await call(env, "POST", "/api/v1/clusters/edge/secure-token")
    assert r.status == 409 and "reinstall" in r.text, r.text
    assert await env.service.store.get_cluster("edge") == Cluster(name="edge", token="s" * 64)


async def test_the_short_form_on_request_and_for_external_clusters(
        make_env: EnvFactory) -> None:
    env = await make_env("enroll:\n  k3s_secure_token: false\n")
    await managed(env)
    cluster = await env.service.store.get_cluster("edge")
    assert cluster is not None and not cluster.ca_cert and len(cluster.token) == 64
    _, config = await k3os_config(env, S0)
    assert config["k3os"]["token"] == cluster.token and K3S_SERVER_CA not in written(config)
    await env.post("/api/v1/clusters", {"name": "ext", "server_url": "https://192.0.2.50:6443",
                                        "token": "t"}, status=201)
    r = await call(env, "POST", "/api/v1/clusters/ext/secure-token")
    assert r.status == 400 and "external" in r.text
    r = await call(env, "POST", "/api/v1/clusters/nope/secure-token")
    assert r.status == 404
    for body in ({"ca_key": "x"}, {"ca_cert": "x"}):
        r = await call(env, "POST", "/api/v1/clusters", json_body={"name": "other", **body})
        assert r.status == 400, r.text


async def test_a_secret_given_for_a_cluster_is_wrapped_in_the_secure_form(env: Env) -> None:
    await env.post("/api/v1/clusters", {"name": "given", "token": "my-secret"}, status=201)
    given = await env.service.store.get_cluster("given")
    assert given is not None
    assert k3s_parse_token(given.token) == (k3s_hash_ca(given.ca_cert.encode()), "server",
                                            "my-secret")


async def test_a_site_template_that_does_not_write_the_ca_is_refused_for_servers(
        make_env: EnvFactory, tmp_path: Path) -> None:
    """A site's k3os.yaml from before netboot made CAs: its servers' k3s would make their
    own CA, which no token names, so every other node would refuse them."""
    own = tmp_path / "templates"
    (own / "cloud-config").mkdir(parents=True)
    text = (templates_dir() / "cloud-config/k3os.yaml").read_text(encoding="utf-8")
    old = text[:text.index("{% if k3s.server_ca %}")] + "\n"
    (own / "cloud-config/k3os.yaml").write_text(old, encoding="utf-8")
    env = await make_env(f"templates:\n  dir: {own}\n")
    await managed(env)
    token = install_token(await boot(env, S0))
    r = await call(env, "GET", f"/config/{hexhyp(S0)}?token={token}", admin=False)
    assert r.status == 500, (r.status, r.text)
    await registered(env, S0, token, "192.0.2.21")
    # An agent's config never has the CA: the same template is fine for it.
    token = install_token(await boot(env, AGENT))
    r = await call(env, "GET", f"/config/{hexhyp(AGENT)}?token={token}", admin=False)
    assert r.status == 200 and "server-ca" not in r.text, r.text


async def test_a_short_token_cluster_is_a_problem_until_given_its_servers_secure_token(
        env: Env) -> None:
    """A managed cluster made before netboot made CAs, whose nodes run already (too late for
    --secure-token): GET names its short token among its problems, with the way out the
    problem names, the secure token its first server wrote (node-token). Given it by PUT,
    the cluster keeps it as given, agents' configs carry it, and the problem is gone
    (s38-journey)."""
    ca, _ = k3s_server_ca()  # the CA its first server made itself
    # (A secret of 16 characters or more: a shorter one is a problem of its own, weak.)
    await env.service.store.put_cluster(Cluster(name="old", token="short-form-secret-4c1e"),
                                        create=True)
    shown = await env.get("/api/v1/clusters/old")
    # (Made before agent tokens too: that is a problem of its own, which the PUT mends.)
    problem, agent = shown["problems"]
    assert problem["field"] == "token" and "node-token" in problem["error"]
    assert agent["field"] == "agent_token" and "no agent token" in agent["error"]
    assert "short-form-secret-4c1e" not in str(shown)
    node_token = f"K10{k3s_hash_ca(ca.encode())}::server:short-form-secret-4c1e"
    r = await call(env, "PUT", "/api/v1/clusters/old", json_body={**shown, "token": node_token})
    assert r.status == 200, r.text
    assert "problems" not in r.json() and "problems" not in await env.get("/api/v1/clusters/old")
    stored = await env.service.store.get_cluster("old")
    assert stored is not None and stored.token == node_token and not stored.ca_cert
    assert k3s_parse_token(stored.token) == (k3s_hash_ca(ca.encode()), "server",
                                             "short-form-secret-4c1e")


# --- the agent token: an agent's config joins no server (s39-agenttok) ----------------------


def strings(value: Any) -> list[str]:
    """Every string in a parsed config, and in the YAML files it writes (k3s's config)."""
    if isinstance(value, str):
        try:
            inner = yaml.safe_load(value)
        except yaml.YAMLError:
            inner = None
        return [value, *(strings(inner) if isinstance(inner, dict | list) else [])]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


@pytest.mark.parametrize("secure", [True, False], ids=["secure", "short"])
@pytest.mark.parametrize("template", ["k3os", "cloud-init"])
async def test_an_agents_config_holds_no_token_a_server_join_accepts(
        make_env: EnvFactory, template: str, secure: bool) -> None:
    """What a host that reads an agent's config gets (as the agent fetches it: its install
    token, no API token), or root on the agent: no string in it joins the cluster's servers
    as a server (k3s's server-bootstrap, its datastore), and its own token joins as an
    agent. Found by s39-attack: every agent carried the cluster's one token."""
    env = await make_env("" if secure else "enroll:\n  k3s_secure_token: false\n")
    await managed(env)
    if template == "cloud-init":
        await env.post("/api/v1/profiles", CLOUD_INIT, status=201)
        for mac in (S0, AGENT):
            r = await call(env, "PATCH", f"/api/v1/machines/{mac}",
                           json_body={"profile": "ubuntu"})
            assert r.status == 200, r.text
    configs = {}
    for mac in (S0, AGENT):
        token = install_token(await boot(env, mac))
        path = (f"/config/{hexhyp(mac)}?token={token}" if template == "k3os"
                else f"/nocloud/{hexhyp(mac)}/{token}/user-data")
        r = await call(env, "GET", path, admin=False)
        assert r.status == 200, (r.status, r.text)
        configs[mac] = (r.text, yaml.safe_load(r.text))
        if mac == S0:
            await registered(env, S0, token, "192.0.2.21")
    server, agent = configs[S0][1], configs[AGENT][1]
    served = written(server)[K3S_SERVER_CA]["content"].encode() if secure else None
    passwd = k3s_users(server)
    found = strings(agent)
    assert not [s for s in found if k3s_joins(passwd, s, "server", served)]
    assert passwd["server"][0] not in configs[AGENT][0]  # nor the server's secret in any form
    joins = [s for s in found if k3s_joins(passwd, s, "agent", served)]
    assert joins and all(s.startswith("K10") == secure for s in joins)
    # The server's own token joins servers (the cluster is still joinable by its servers).
    token = (server["k3os"]["token"] if template == "k3os" else
             yaml.safe_load(written(server)[K3S_CONFIG_FILE]["content"])["token"])
    assert k3s_joins(passwd, token, "server", served)


async def test_a_cluster_made_before_gets_an_agent_token_at_start_up_unless_a_node_has_its_config(
        tmp_path: Path, aiohttp_client: Any) -> None:
    """A cluster an older netboot made has no agent token. One whose nodes have no config
    yet gets one when netboot starts, before it serves any; one whose server already runs
    keeps its agents on the cluster's token (that server was told no agent token, and would
    refuse agents given one), until its nodes are reinstalled and netboot restarted."""
    cfg = load(write_config(tmp_path), env={})
    service = await build(cfg)
    try:
        client = await aiohttp_client(FrontTestServer(service))
        env = Env(service, client, (cfg.data_dir / "admin.token").read_text().strip())
        for name in ("idle", "running"):
            await service.store.put_cluster(Cluster(name=name, token=name * 8), create=True)
        await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                            "initrds": ["initrd.img"]}, status=201)
        for mac, cluster, role in ((S0, "running", "server"), (AGENT, "running", "agent"),
                                   (S1, "idle", "server")):
            await env.post("/api/v1/machines", {"mac": mac, "cluster": cluster, "role": role,
                                                "profile": "k3os"}, status=201)
        token, running_server = await k3os_config(env, S0)  # the cluster forms
        assert K3S_CONFIG_FILE not in written(running_server)
        await registered(env, S0, token, "192.0.2.21")
    finally:
        await service.boot.drain()
        service.content.close()
        await service.store.close()
    service = await build(cfg)  # netboot started again (this version)
    try:
        client = await aiohttp_client(FrontTestServer(service))
        env = Env(service, client, (cfg.data_dir / "admin.token").read_text().strip())
        idle = await service.store.get_cluster("idle")
        running = await service.store.get_cluster("running")
        assert idle is not None and len(idle.agent_token) == 64 and idle.token == "idle" * 8
        assert running == Cluster(name="running", token="running" * 8)
        _, agent = await k3os_config(env, AGENT)
        assert k3s_joins(k3s_users(running_server), agent["k3os"]["token"], "agent")
        _, idle_server = await k3os_config(env, S1)
        assert k3s_users(idle_server)["node"][0] == idle.agent_token
        # The operator is told, where a cluster's problems are read, with the way out.
        shown = await env.get("/api/v1/clusters/running")
        (problem,) = [p for p in shown.get("problems", ()) if p["field"] == "agent_token"]
        assert "root on an agent" in problem["error"] and "reinstall" in problem["error"]
        assert "running" * 8 not in str(shown)
        idle_shown = await env.get("/api/v1/clusters/idle")  # (its short token's is said)
        assert [p["field"] for p in idle_shown.get("problems", ())] == ["token"]
        for mac in (S0, AGENT):
            await env.post(f"/api/v1/machines/{mac}/reinstall", {}, status=200)
        r = await call(env, "PUT", "/api/v1/clusters/running", json_body=shown)
        assert r.status == 200, r.text
        assert [p["field"] for p in r.json().get("problems", ())] == ["token"], r.text
        running = await service.store.get_cluster("running")
        assert running is not None and len(running.agent_token) == 64
    finally:
        await service.boot.drain()
        service.content.close()
        await service.store.close()


async def test_a_cluster_turned_external_and_back_keeps_what_its_nodes_joined_with(
        env: Env) -> None:
    """A PUT that turned a managed cluster external (a wrong URL, corrected) dropped its k3s
    CA and kept its token, which names that CA; made managed again, its next first server
    got no CA files (k3s makes its own) and that token: every agent refused it ("token CA
    hash does not match"), silently, the key gone for good. Found by s40-attack: the switch
    is refused while a node has its config, and an external cluster made managed is a new
    managed cluster."""
    await managed(env)
    external = {"server_url": "https://192.0.2.50:6443"}
    before = await env.service.store.get_cluster("edge")
    await k3os_config(env, S0)  # its first server runs on the cluster's CA from now on
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body=external)
    assert r.status == 409 and r.json()["field"] == "server_url", r.text
    assert S0 in r.text and "reinstall" in r.text
    assert await env.service.store.get_cluster("edge") == before
    # A cluster none of whose nodes has its config: the switch is free, both ways.
    await env.post("/api/v1/clusters", {"name": "fresh", "server_url": "managed"}, status=201)
    r = await call(env, "PUT", "/api/v1/clusters/fresh", json_body=external)
    assert r.status == 200, r.text
    r = await call(env, "PUT", "/api/v1/clusters/fresh", json_body={"server_url": "managed"})
    assert r.status == 200, r.text
    for mac, role in ((S1, "server"), (AGENT, "agent")):
        r = await call(env, "PATCH", f"/api/v1/machines/{mac}",
                       json_body={"cluster": "fresh", "role": role})
        assert r.status == 200, r.text
    token, server = await k3os_config(env, S1)
    await registered(env, S1, token, "192.0.2.22")
    _, agent = await k3os_config(env, AGENT)
    # What the server's /cacerts serves: the CA its config wrote, else one k3s makes.
    ca = written(server).get(K3S_SERVER_CA)
    served = ca["content"].encode() if ca else k3s_server_ca()[0].encode()
    assert k3s_joins(k3s_users(server), agent["k3os"]["token"], "agent", served)


async def test_an_external_clusters_agents_join_with_the_agent_token_its_operator_gave(
        env: Env) -> None:
    """An external cluster's servers are not netboot's: their agent token, if they have one,
    is the operator's to give (the servers' server/agent-token file); an edit without it
    keeps it; without one, agents get the cluster's token as before."""
    agent_token = "K10" + "1" * 64 + "::node:" + "b" * 32
    await env.post("/api/v1/clusters", {"name": "ext", "server_url": "https://192.0.2.50:6443",
                                        "token": "K10" + "1" * 64 + "::server:" + "c" * 32,
                                        "agent_token": agent_token}, status=201)
    shown = await env.get("/api/v1/clusters/ext")
    assert "agent_token" not in shown and "b" * 32 not in str(shown)
    r = await call(env, "PUT", "/api/v1/clusters/ext", json_body={**shown, "labels": {"a": "b"}})
    assert r.status == 200, r.text
    stored = await env.service.store.get_cluster("ext")
    assert stored is not None and stored.agent_token == agent_token
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                        "initrds": ["initrd.img"]}, status=201)
    for mac, role in ((AGENT, "agent"), (S0, "server")):
        await env.post("/api/v1/machines", {"mac": mac, "cluster": "ext", "role": role,
                                            "profile": "k3os"}, status=201)
    _, agent = await k3os_config(env, AGENT)
    assert agent["k3os"]["token"] == agent_token
    _, server = await k3os_config(env, S0)  # a server joining it: both, as k3s wants
    assert server["k3os"]["token"] == stored.token
    assert k3s_users(server)["node"][0] == "b" * 32


async def test_an_agent_token_given_in_the_secure_form_is_taken_as_its_secret(env: Env) -> None:
    """k3s keeps a server's agent-token as given: a K10 form given to a managed cluster is
    taken as the secret it wraps and wrapped with the cluster's own CA, never twice."""
    await env.post("/api/v1/clusters", {"name": "edge",
                                        "agent_token": "K10" + "2" * 64 + "::node:given"},
                   status=201)
    cluster = await env.service.store.get_cluster("edge")
    assert cluster is not None and cluster.ca_cert
    assert k3s_parse_token(cluster.agent_token) == (k3s_hash_ca(cluster.ca_cert.encode()),
                                                    "node", "given")
    # Five characters every agent's config carries: said, as a weak join token is.
    (problem,) = (await env.get("/api/v1/clusters/edge"))["problems"]
    assert problem == {"field": "agent_token", "error": problem["error"]}
    assert problem["error"].startswith("a weak k3s agent token: its secret is 5 characters")


async def test_an_agent_token_given_with_json_escaped_characters_is_given_to_servers(
        env: Env) -> None:
    """An operator's own agent token may hold characters the templates' ``tojson`` escapes
    (``&``, ``<``, ``>``, ``'``: ``\\u0026``…; k3s takes any text): its servers are given it
    all the same, as k3s reads it from its config file, and agents join with it; the check
    that a server's template gives it must not take the escaped form for a missing one
    (every server's config was a 500)."""
    secret = "it's-<edge>&agent-9f3c1d"
    await managed(env, body={"agent_token": secret})
    cluster = await env.service.store.get_cluster("edge")
    assert cluster is not None and k3s_parse_token(cluster.agent_token)[2] == secret
    token, server = await k3os_config(env, S0)
    assert k3s_users(server)["node"][0] == secret
    await registered(env, S0, token, "192.0.2.21")
    _, agent = await k3os_config(env, AGENT)
    assert k3s_joins(k3s_users(server), agent["k3os"]["token"], "agent")
    # cloud-init's user-data (the secret once JSON-escaped, in k3s's config file) too.
    await env.post("/api/v1/profiles", CLOUD_INIT, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:37:00:03", "cluster": "edge",
                                        "role": "server", "profile": "ubuntu"}, status=201)
    token = install_token(await boot(env, "52:54:00:37:00:03"))
    r = await call(env, "GET", f"/nocloud/{hexhyp('52:54:00:37:00:03')}/{token}/user-data",
                   admin=False)
    assert r.status == 200, (r.status, r.text)
    assert k3s_users(yaml.safe_load(r.text))["node"][0] == secret


async def test_a_running_clusters_agent_token_is_changed_only_by_force_which_tells_its_nodes(
        env: Env) -> None:
    """k3s has no rotation of the agent token (``k3s token rotate`` changes the server token
    alone): a server keeps the agent-token its config gave it, an agent the token it joined
    with, presented again at each start of k3s. A new agent token given to a cluster whose
    server has its config gave the next agents a token that server refuses: refused with a
    409 naming the fix (reinstall, or change it by hand and force), nothing changed; with
    ``force=true`` it is taken, and each configured node's history says what it breaks."""
    await managed(env)
    token, server = await k3os_config(env, S0)
    await registered(env, S0, token, "192.0.2.21")
    before = await env.service.store.get_cluster("edge")
    assert before is not None
    new = {"name": "edge", "server_url": "managed", "agent_token": "n3w-agent-secret-4f9a2c"}
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body=new)
    assert r.status == 409, r.text
    assert r.json()["field"] == "agent_token" and "reinstall" in r.json()["error"]
    assert "/api/v1/clusters/edge?force=true" in r.json()["error"] and S0 in r.json()["error"]
    assert await env.service.store.get_cluster("edge") == before
    _, agent = await k3os_config(env, AGENT)  # the next agent still joins the running server
    assert k3s_joins(k3s_users(server), agent["k3os"]["token"], "agent")
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=maybe", json_body=new)
    assert r.status == 400 and r.json()["field"] == "force", r.text
    # The same token given again (a body read and written back) is no change.
    same = {**new, "agent_token": token_secret(before.agent_token)}
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body=same)
    assert r.status == 200, r.text
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true", json_body=new)
    assert r.status == 200, r.text
    after = await env.service.store.get_cluster("edge")
    assert after is not None and k3s_parse_token(after.agent_token)[2] == new["agent_token"]
    told = {}
    for mac in (S0, AGENT):
        events = await env.get(f"/api/v1/machines/{mac}/events")
        told[mac] = [e["message"] for e in events if e["kind"] == "agent token changed"]
    assert len(told[S0]) == 1 and len(told[AGENT]) == 1, told
    assert "keeps the old one" in told[S0][0]
    assert new["agent_token"] not in str(told)


async def test_a_running_clusters_token_is_changed_only_by_force_which_tells_its_nodes(
        env: Env) -> None:
    """The cluster's own (server) token as its agent token is: k3s's way to change it is
    ``k3s token rotate`` on a server and every node restarted with the new one (k3s-io/k3s
    docs/adrs/server-token-rotation.md); given to netboot alone while a server of it runs,
    every server installed next was given a token the running one refuses. Refused with a
    409 naming the fix, nothing changed; its own token given back is no change; with
    ``force=true`` taken, and each configured node's history says what it breaks."""
    await managed(env)
    token, server = await k3os_config(env, S0)
    await registered(env, S0, token, "192.0.2.21")
    before = await env.service.store.get_cluster("edge")
    assert before is not None
    new = {"name": "edge", "server_url": "managed", "token": "n3w-server-secret-9b7d1e"}
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body=new)
    assert r.status == 409, r.text
    assert r.json()["field"] == "token" and "k3s token rotate" in r.json()["error"]
    assert "/api/v1/clusters/edge?force=true" in r.json()["error"] and S0 in r.json()["error"]
    assert await env.service.store.get_cluster("edge") == before
    _, second = await k3os_config(env, S1)  # the next server still joins the running one
    assert k3s_joins(k3s_users(server), second["k3os"]["token"], "server")
    for same in (before.token, token_secret(before.token)):  # given back: no change
        r = await call(env, "PUT", "/api/v1/clusters/edge", json_body={**new, "token": same})
        assert r.status == 200, r.text
        assert await env.service.store.get_cluster("edge") == before
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true", json_body=new)
    assert r.status == 200, r.text
    after = await env.service.store.get_cluster("edge")
    assert after is not None and k3s_parse_token(after.token)[2] == new["token"]
    assert after.agent_token == before.agent_token
    told = {}
    for mac in (S0, S1, AGENT):
        events = await env.get(f"/api/v1/machines/{mac}/events")
        told[mac] = [e["message"] for e in events if e["kind"] == "token changed"]
    assert len(told[S0]) == 1 and len(told[S1]) == 1 and not told[AGENT], told
    assert "keeps the old one" in told[S0][0] and "registered" in told[S0][0]
    assert new["token"] not in str(told)


async def test_a_forced_token_change_is_told_to_its_nodes_once_and_only_when_it_is_made(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced change's "agent token changed" events are written with the change: another
    writer's edit of the cluster between the PUT's read and its write (its compare-and-set
    refused, made again on the edit) told every node twice, and edits at each try (the PUT
    refused, 409, nothing changed) left each node's history saying a change no one made
    (s41-review: the events were committed while the change was being checked)."""
    await managed(env)
    token, _ = await k3os_config(env, S0)
    await registered(env, S0, token, "192.0.2.21")
    store = env.service.store
    before = await store.get_cluster("edge")
    assert before is not None
    put = store.put_cluster
    edits, races = [0], [100]  # an edit before every try: refused, nothing changed

    async def raced(cluster: Cluster, *, create: bool = False,
                    expect: Cluster | None = None) -> None:
        if expect is not None and edits[0] < races[0]:
            # Another operator's edit (a label) committed just before this write.
            edits[0] += 1
            stored = await store.get_cluster(cluster.name)
            assert stored is not None
            await put(replace(stored, labels={**stored.labels, "edit": str(edits[0])}))
        await put(cluster, create=create, expect=expect)

    monkeypatch.setattr(store, "put_cluster", raced)
    new = {"name": "edge", "server_url": "managed", "agent_token": "n3w-agent-secret-4f9a2c"}
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true", json_body=new)
    assert r.status == 409, r.text
    after = await store.get_cluster("edge")
    assert after is not None and after.agent_token == before.agent_token

    async def told(mac: str) -> list[str]:
        return [e["message"] for e in await env.get(f"/api/v1/machines/{mac}/events")
                if e["kind"] == "agent token changed"]

    assert await told(S0) == [] and await told(AGENT) == []
    edits[0], races[0] = 0, 1  # one edit: made again on it, and taken
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true", json_body=new)
    assert r.status == 200, r.text
    after = await store.get_cluster("edge")
    assert after is not None and k3s_parse_token(after.agent_token)[2] == new["agent_token"]
    assert len(await told(S0)) == 1 and await told(AGENT) == []  # AGENT has no config


@pytest.mark.parametrize("how", ["refused", "lost, stored", "lost, not stored",
                                 "lost, stored, unread"])
async def test_a_forced_change_saved_is_answered_as_saved_when_its_events_fail_to_write(
        env: Env, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A forced agent token change committed, then its nodes' events refused by the store
    (a full disk, a lock past its wait): the PUT answers the change it made (200, the new
    token's cluster), and the events are queued and written once the store takes writes
    again. It answered the events' error (a 503) for a change that was saved: the operator
    read it as not made and retried, and no node's history said what broke its k3s.
    Their commit's answer lost (OutcomeUnknown: the database failed over as it committed,
    stored or not), they are read back and only those not stored queued: all were queued
    again, and a stored commit told each node's history of the change twice (s43-review).
    Not read back either (the read fails too), they are not written again: at most once,
    the recorder's rule for a write whose outcome is unknown."""
    from netboot.errors import OutcomeUnknown

    await managed(env)
    token, _ = await k3os_config(env, S0)
    await registered(env, S0, token, "192.0.2.21")
    store = env.service.store
    apply = store.apply_batch
    refused = [0]

    async def full(batch: Batch) -> None:
        if any(e.kind == "agent token changed" for e in batch.events) and not refused[0]:
            refused[0] += 1
            if how == "refused":
                raise StoreError("database or disk is full")
            if how.startswith("lost, stored"):
                await apply(batch)
            raise OutcomeUnknown("the connection failed while the commit was under way")
        await apply(batch)

    monkeypatch.setattr(store, "apply_batch", full)
    if how.endswith("unread"):
        events = store.list_events
        unread = [0]

        async def down(machine_id: str, **kw: Any) -> Any:
            if refused[0] and not unread[0]:  # the read back, once
                unread[0] += 1
                raise StoreError("the inventory is unreachable")
            return await events(machine_id, **kw)

        monkeypatch.setattr(store, "list_events", down)
    new = {"name": "edge", "server_url": "managed", "agent_token": "n3w-agent-secret-4f9a2c"}
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true", json_body=new)
    assert refused[0] == 1
    assert r.status == 200, r.text
    after = await store.get_cluster("edge")
    assert after is not None and k3s_parse_token(after.agent_token)[2] == new["agent_token"]
    await env.service.boot.drain()  # the queued events' group commit
    told = [e["message"] for e in await env.get(f"/api/v1/machines/{S0}/events")
            if e["kind"] == "agent token changed"]
    assert len(told) == 1, told


async def test_a_running_short_token_cluster_is_given_its_first_servers_secure_token(
        env: Env) -> None:
    """README's way out for a short-token cluster whose nodes run: the secure token its
    first server wrote (node-token) wraps the secret the cluster has, so it is no change of
    the token k3s compares and is taken without force."""
    ca, _ = k3s_server_ca()
    await env.service.store.put_cluster(Cluster(name="edge", token="short-form-secret-4c1e"),
                                        create=True)
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                        "initrds": ["initrd.img"]}, status=201)
    await env.post("/api/v1/machines", {"mac": S0, "hostname": "s0", "cluster": "edge",
                                        "role": "server", "profile": "k3os"}, status=201)
    await k3os_config(env, S0)
    node_token = f"K10{k3s_hash_ca(ca.encode())}::server:short-form-secret-4c1e"
    r = await call(env, "PUT", "/api/v1/clusters/edge",
                   json_body={"name": "edge", "server_url": "managed", "token": node_token})
    assert r.status == 200, r.text
    stored = await env.service.store.get_cluster("edge")
    assert stored is not None and stored.token == node_token


async def test_a_rotated_token_given_as_its_servers_node_token_is_taken_as_its_secret(
        env: Env) -> None:
    """After ``k3s token rotate --new-token NEW`` on a server of a managed cluster, the
    server's node-token file holds ``K10<the cluster's CA hash>::server:NEW``: the form an
    operator copies, and what the 409 of a token change leads to (then given with force).
    It was wrapped whole with the CA's hash again (``K10<hash>::server:K10<hash>::server:
    NEW``), whose password k3s reads as ``K10<hash>::server:NEW`` (parseToken: after the
    first ``::`` and the user): every node installed next was refused by the servers on NEW.
    Its secret is taken, as an agent token's secure form is; another CA's form stays as
    given (test_a_cluster_made_before_keeps_its_short_token_until_its_operator_opts_in)."""
    await managed(env)
    token, _ = await k3os_config(env, S0)
    await registered(env, S0, token, "192.0.2.21")
    before = await env.service.store.get_cluster("edge")
    assert before is not None and before.ca_cert
    ca_hash = k3s_hash_ca(before.ca_cert.encode())
    rotated = f"K10{ca_hash}::server:r0tated-server-secret-5e2a9c"
    body = {"name": "edge", "server_url": "managed", "token": rotated}
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body=body)
    assert r.status == 409 and r.json()["field"] == "token", r.text
    r = await call(env, "PUT", "/api/v1/clusters/edge?force=true", json_body=body)
    assert r.status == 200, r.text
    after = await env.service.store.get_cluster("edge")
    assert after is not None and after.token == rotated, after.token
    assert k3s_parse_token(after.token) == (ca_hash, "server", "r0tated-server-secret-5e2a9c")
    _, second = await k3os_config(env, S1)  # the next server joins the rotated ones
    assert second["k3os"]["token"] == rotated


async def test_an_agent_token_with_a_colon_in_its_secret_joins_the_servers(env: Env) -> None:
    """A server is given the agent token's password as k3s parses it from the agents' token
    (parseToken: after ``K10<hash>::``, after the first ``:``, the user's), not the text
    after its last ``:`` (Cluster.agent_secret): an operator's agent secret with a ``:``
    (``site:pass``) gave the servers ``pass`` and the agents ``site:pass``, and every agent
    was refused."""
    await managed(env, body={"agent_token": "site:agent-pass-7c41e09b"})
    token, server = await k3os_config(env, S0)
    await registered(env, S0, token, "192.0.2.21")  # the cluster's endpoint: agents boot
    _, agent = await k3os_config(env, AGENT)
    users = k3s_users(server)
    assert users["node"][0] == "site:agent-pass-7c41e09b", users
    assert k3s_joins(users, agent["k3os"]["token"], "agent")
