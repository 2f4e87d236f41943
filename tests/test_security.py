"""Several machines without open doors, on real servers on 127.0.0.1: a Prefect server with basic authentication,
Redis with a password and TLS, S3 (moto) over HTTPS with a CA made here. A client without a secret gets one line;
with every secret set, no secret appears in any file, output, object or anything the Prefect server stores."""

import base64
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import httpx
import pytest
import redis
from botocore.config import Config

from conftest import free_port, stop_process
from helpers import run_cli
from synthetic import write_source
from tasks.errors import PipelineError
from tasks.locks import RedisLockManager

REPO = Path(__file__).resolve().parents[1]
# The secrets of this module's servers: each one distinct, so that any copy of one anywhere is found.
AUTH = f"admin:auth-{uuid.uuid4().hex}"
REDIS_PASSWORD = f"redis{uuid.uuid4().hex}"
AWS_SECRET = f"aws-secret-{uuid.uuid4().hex}"
AWS_KEY_ID = "mnist-pipeline-test"
# Each secret as it may appear: itself, and the auth string as clients send it (a basic-auth header).
SECRETS = {"Prefect auth string": AUTH, "Prefect auth header": base64.b64encode(AUTH.encode()).decode(),
           "Redis password": REDIS_PASSWORD, "AWS secret key": AWS_SECRET}
SYNTHETIC = {"MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]", "MNIST_PIPELINE_DOWNLOAD__RETRIES": "0",
             "MNIST_PIPELINE_VALIDATION__TRAIN_COUNT": "200", "MNIST_PIPELINE_VALIDATION__TEST_COUNT": "50",
             "MNIST_PIPELINE_TRAIN__JIT_COMPILE": "false", "MNIST_PIPELINE_PROMOTION__MIN_TEST_ACCURACY": "0"}
TINY = ["--epochs", "1", "--hidden-units", "16", "--batch-size", "32"]


def make_certs(folder: Path) -> SimpleNamespace:
    """Write a CA and a certificate for 127.0.0.1 signed by it (ECDSA P-256, valid one day); return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = SimpleNamespace(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")
    paths.ca.write_bytes(certificate("mnist-pipeline test CA", ca_key, "mnist-pipeline test CA", ca_key, True)
                         .public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(certificate("127.0.0.1", key, "mnist-pipeline test CA", ca_key, False)
                           .public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return paths


def start(command: list[str], log: Path, ready, timeout: float, **kwargs) -> subprocess.Popen:
    """Start a server in its own session (stopped by PID with stop_process); wait until `ready()` holds."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return proc
        except Exception:  # not answering yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"{command[0]} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with basic authentication (its own PREFECT_HOME and SQLite)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_AUTH_STRING": AUTH,
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)

    def healthy() -> bool:  # /api/health answers without the auth string
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200

    proc = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 home / "server.log", healthy, 300, cwd=home, env=env)
    try:
        yield SimpleNamespace(api=f"{url}/api", home=home)
    finally:
        stop_process(proc)


# A TLS proxy in front of the Prefect server, as the README's multi-machine setup has one (nginx: its websockets too).
NGINX_CONF = """
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{}}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def prefect_https(prefect_server, tls, tmp_path_factory):
    """nginx on 127.0.0.1 speaking HTTPS (the test CA's certificate) in front of `prefect_server`."""
    import shutil

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is not installed (.ci/run installs Debian's nginx-light)"
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(folder=folder, port=port, cert=tls.cert, key=tls.key,
                                      upstream=prefect_server.api.split("//")[1].split("/")[0]))
    api = f"https://127.0.0.1:{port}/api"

    def healthy() -> bool:
        return httpx.get(f"{api}/health", verify=ssl.create_default_context(cafile=tls.ca), timeout=2).status_code == 200

    proc = start([nginx, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")], folder / "nginx.out",
                 healthy, 30, cwd=folder)
    try:
        yield SimpleNamespace(api=api, folder=folder)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def redis_secure(tmp_path_factory, tls):
    """Debian's redis-server with a password, on a plain port and a TLS port; return both URLs."""
    folder = tmp_path_factory.mktemp("redis")
    port, tls_port = free_port(), free_port()
    plain = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    proc = start(["redis-server", "--port", str(port), "--tls-port", str(tls_port), "--bind", "127.0.0.1",
                  "--requirepass", REDIS_PASSWORD, "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                  "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
                 folder / "redis.log", lambda: redis.Redis.from_url(plain).ping(), 30, cwd=folder)
    try:
        tls_url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={tls.ca}"
        yield SimpleNamespace(plain=plain, tls=tls_url, port=port, tls_port=tls_port)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def s3_https(tmp_path_factory, tls):
    """moto's S3 server over HTTPS (its certificate signed by the test CA); return its endpoint and AWS variables."""
    folder = tmp_path_factory.mktemp("moto")
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, verify=str(tls.ca), aws_access_key_id=AWS_KEY_ID,
                          aws_secret_access_key=AWS_SECRET, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}))
    proc = start([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port),
                  "-c", str(tls.cert), "-k", str(tls.key)], folder / "moto.log", lambda: client.list_buckets(), 60,
                 cwd=folder)
    try:
        yield SimpleNamespace(url=url, client=client, env={
            "AWS_ENDPOINT_URL": url, "AWS_CA_BUNDLE": str(tls.ca), "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"})
    finally:
        stop_process(proc)


def client_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment of a client machine: its own PREFECT_HOME and temp folder under `tmp_path`, no AWS, Prefect
    API or pipeline variables but `variables` and the synthetic source's."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AWS_", "PREFECT_API", "MNIST_PIPELINE_"))}
    for folder in ("home", "tmp"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return {**env, "PREFECT_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
            "MNIST_PIPELINE_LOCAL_SERVER": "false", **SYNTHETIC, **variables}


def error_line(result: subprocess.CompletedProcess) -> str:
    """Return the one line a failed command printed (asserting it failed with exactly that: exit 1, no traceback)."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist-pipeline: error: "), result.stderr[-3000:]
    return lines[0]


def test_a_client_without_the_auth_string_gets_one_line_naming_the_server_and_what_to_set(prefect_server, tmp_path):
    write_source(tmp_path / "source")
    args = ["run", "--until", "validate", "--source", str(tmp_path / "source"), "--data-dir", str(tmp_path / "data"),
            "--artifacts-dir", str(tmp_path / "artifacts")]
    for auth, found in ((None, "none"), ("admin:not-the-secret", "one it refuses")):
        given = {"PREFECT_API_AUTH_STRING": auth} if auth else {}
        env = client_env(tmp_path, PREFECT_API_URL=prefect_server.api, **given)
        line = error_line(run_cli(env, args))
        assert line == (f"mnist-pipeline: error: Prefect API {prefect_server.api}: expected its server's auth "
                        "string (PREFECT_SERVER_API_AUTH_STRING) in PREFECT_API_AUTH_STRING, found "
                        f"{found} (401 Unauthorized)")
        assert not (tmp_path / "data").exists()  # before any stage

    result = run_cli(client_env(tmp_path, PREFECT_API_URL=prefect_server.api, PREFECT_API_AUTH_STRING=AUTH), args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["download", "completed"],
                                                                         ["validate", "completed"]]


def test_the_prefect_api_over_https_through_a_tls_proxy_and_a_client_without_its_ca(prefect_https, prefect_server,
                                                                                    tls, tmp_path):
    write_source(tmp_path / "source")
    args = ["run", "--json", "--until", "validate", "--source", str(tmp_path / "source"), "--data-dir",
            str(tmp_path / "data"), "--artifacts-dir", str(tmp_path / "artifacts")]
    env = client_env(tmp_path, PREFECT_API_URL=prefect_https.api, PREFECT_API_AUTH_STRING=AUTH)

    line = error_line(run_cli(env, args))  # the proxy's certificate is signed by a CA this client does not know
    assert line.startswith(f"mnist-pipeline: error: Prefect API {prefect_https.api}: expected a certificate that "
                           "this client trusts (signed by the system's CAs or the CA in PREFECT_API_SSL_CERT_FILE), "
                           "found one it cannot verify ([SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert not (tmp_path / "data").exists()

    result = run_cli({**env, "PREFECT_API_SSL_CERT_FILE": str(tls.ca)}, args)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads(result.stdout)["run_id"]
    # Everything the run sent went through the proxy over TLS: its states, its logs, its events (a websocket).
    records = api_records(prefect_server.api)
    (flow_run,) = [run for run in records["flow_runs"] if run["id"] == run_id]
    assert flow_run["state_type"] == "COMPLETED"
    assert any(entry["flow_run_id"] == run_id for entry in records["logs"])
    assert '"GET /api/events/in HTTP/1.1" 101 ' in (prefect_https.folder / "access.log").read_text()  # a websocket
    deadline = time.monotonic() + 60  # the server stores the events it receives in batches
    while not any(event["resource"]["prefect.resource.id"] == f"prefect.flow-run.{run_id}"
                  for event in api_records(prefect_server.api)["events"]):
        assert time.monotonic() < deadline, "no event of the run reached the server through the proxy"
        time.sleep(1)


def test_redis_locks_with_a_password_and_over_tls(redis_secure, tls, tmp_path):
    for url in (redis_secure.plain, redis_secure.tls):
        ours, theirs = (RedisLockManager(url, namespace=tmp_path.name, expiry_s=1.5) for _ in range(2))
        ours.check()
        assert ours.acquire_lock("k", "us")
        time.sleep(1.0)  # renewed over the same connection kind
        assert theirs.is_locked("k") and not theirs.acquire_lock("k", "them", acquire_timeout=0.2)
        ours.release_lock("k", "us")
        assert theirs.acquire_lock("k", "them", acquire_timeout=1)
        theirs.release_lock("k", "them")

    tls_port, port = redis_secure.tls_port, redis_secure.port
    password = "expected the Redis server's password in the URL (redis://:PASSWORD@HOST:PORT/DB), found"
    cases = [  # (URL, how its one line starts)
        (f"redis://:wrong-password@127.0.0.1:{port}/0",
         f"locks redis://:***@127.0.0.1:{port}/0: {password} a password it refuses ("),
        (f"redis://127.0.0.1:{port}/0", f"locks redis://127.0.0.1:{port}/0: {password} none ("),
        (f"rediss://:wrong-password@127.0.0.1:{tls_port}/0?ssl_ca_certs={tls.ca}",
         f"locks rediss://:***@127.0.0.1:{tls_port}/0?ssl_ca_certs={tls.ca}: {password} a password it refuses ("),
        (f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{tls_port}/0",  # no CA: its certificate is not trusted
         (f"locks rediss://:***@127.0.0.1:{tls_port}/0: expected a Redis server answering there, found none (Error 1 "
          "connecting to 127.0.0.1")),
    ]
    for url, start in cases:
        with pytest.raises(PipelineError) as error:
            RedisLockManager(url, namespace=tmp_path.name).check()
        message = str(error.value)
        assert message.startswith(start) and "\n" not in message
        assert REDIS_PASSWORD not in message and "wrong-password" not in message

    write_source(tmp_path / "source")
    line = error_line(run_cli(client_env(tmp_path), [
        "run", "--source", str(tmp_path / "source"), "--data-dir", str(tmp_path / "data"), "--artifacts-dir",
        str(tmp_path / "artifacts"), "--locks", cases[0][0]]))
    assert line.startswith("mnist-pipeline: error: " + cases[0][1]) and "wrong-password" not in line


@pytest.mark.slow
def test_a_sweep_on_a_dask_cluster_with_mutual_tls_and_a_client_without_its_certificate(tls, prefect_api_url,
                                                                                      tmp_path):
    from distributed import Client
    from distributed.security import Security
    from test_sweep import DASK, worker_env

    from flows.sweep import TLS_SETTINGS

    address = f"tls://127.0.0.1:{free_port()}"
    certificate = ["--tls-ca-file", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    security = Security(tls_ca_file=str(tls.ca), tls_client_cert=str(tls.cert), tls_client_key=str(tls.key),
                        require_encryption=True)

    def workers() -> int:
        with Client(address, security=security, timeout=5) as client:
            return len(client.scheduler_info()["workers"])

    env = worker_env(prefect_api_url, tmp_path)
    scheduler = start([DASK, "scheduler", "--host", address.rsplit(":", 1)[0], "--port", address.rsplit(":", 1)[1],
                       "--no-dashboard", *certificate], tmp_path / "scheduler.log", lambda: workers() == 0, 60,
                      cwd=tmp_path, env=env)
    worker = None
    try:
        worker = start([DASK, "worker", address, "--nthreads", "1", "--name", "w0", "--no-dashboard", *certificate],
                       tmp_path / "worker.log", lambda: workers() == 1, 120, cwd=tmp_path, env=env)
        write_source(tmp_path / "source")
        args = ["sweep", "--json", "--grid", "hidden_units=16,24", "--dask-address", address, "--source",
                str(tmp_path / "source"), "--data-dir", str(tmp_path / "data"), "--artifacts-dir",
                str(tmp_path / "artifacts"), *TINY]
        client = client_env(tmp_path, PREFECT_API_URL=prefect_api_url)
        settings = dict(zip(TLS_SETTINGS, (str(tls.ca), str(tls.cert), str(tls.key))))

        # No certificate: one line naming Dask's settings.
        line = error_line(run_cli(client, args))
        assert line == (f"mnist-pipeline: error: dask scheduler {address}: expected Dask's TLS settings for a tls:// "
                        "address (the CA, this client's certificate and key: " + ", ".join(TLS_SETTINGS) + "), found none")
        # A certificate that the cluster's CA did not sign: refused by the scheduler.
        (tmp_path / "stranger").mkdir()
        stranger = make_certs(tmp_path / "stranger")
        refused = {**settings, list(TLS_SETTINGS)[1]: str(stranger.cert), list(TLS_SETTINGS)[2]: str(stranger.key)}
        line = error_line(run_cli({**client, **refused}, args))
        assert line.startswith(f"mnist-pipeline: error: dask scheduler {address}: expected a TLS handshake with the "
                               "certificate of Dask's TLS settings, found it refused (") and "SSL" in line
        assert not (tmp_path / "data").exists()  # before any stage

        result = run_cli({**client, **settings}, args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [row["state"] for row in json.loads(result.stdout)["trials"]] == ["trained", "trained"]
        with Client(address, security=security, timeout=5) as check:  # the trials went through this scheduler
            assert check.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter) > 0
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                stop_process(proc)


def test_an_https_endpoint_whose_certificate_is_not_trusted_is_one_line(s3_https, tmp_path):
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_https.client.create_bucket(Bucket=bucket)
    write_source(tmp_path / "source")
    env = client_env(tmp_path, **{name: value for name, value in s3_https.env.items() if name != "AWS_CA_BUNDLE"})
    line = error_line(run_cli(env, ["run", "--source", str(tmp_path / "source"), "--data-dir", f"s3://{bucket}/data",
                                    "--artifacts-dir", f"s3://{bucket}/artifacts"]))
    assert line.startswith(f"mnist-pipeline: error: data-dir s3://{bucket}/data: expected an S3 API answering at "
                           f"{s3_https.url}, found none (SSL validation failed for {s3_https.url}/")
    assert "CERTIFICATE_VERIFY_FAILED" in line and AWS_SECRET not in line


def api_records(api: str) -> dict[str, list]:
    """Return what the Prefect server stores, read through its API with the auth string: flow runs (their
    parameters), task runs, logs, artifacts, events, deployments, blocks (secrets included) and variables."""
    records: dict[str, list] = {}
    header = {"Authorization": f"Basic {SECRETS['Prefect auth header']}"}
    with httpx.Client(base_url=api, headers=header, timeout=30) as client:
        for kind, body in (("flow_runs", {}), ("task_runs", {}), ("logs", {}), ("artifacts", {}), ("deployments", {}),
                           ("block_documents", {"include_secrets": True}), ("variables", {})):
            records[kind] = []
            while True:
                page = client.post(f"/{kind}/filter", json={**body, "limit": 200, "offset": len(records[kind])})
                page.raise_for_status()
                records[kind] += page.json()
                if len(page.json()) < 200:
                    break
        page = client.post("/events/filter", json={"limit": 50}).raise_for_status().json()
        records["events"] = page["events"]
        while page.get("next_page"):
            page = client.get(page["next_page"]).raise_for_status().json()
            records["events"] += page["events"]
    return records


def files_under(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_no_secret_appears_in_any_file_output_object_or_server_record(prefect_server, redis_secure, s3_https, tmp_path):
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_https.client.create_bucket(Bucket=bucket)
    source = tmp_path / "source"
    write_source(source)
    env = client_env(tmp_path, PREFECT_API_URL=prefect_server.api, PREFECT_API_AUTH_STRING=AUTH, **s3_https.env)
    roots = ["--data-dir", f"s3://{bucket}/team/data", "--artifacts-dir", f"s3://{bucket}/team/artifacts"]
    store = ["--artifacts-dir", f"s3://{bucket}/team/artifacts", "--locks", redis_secure.tls]
    config = ["--source", str(source), *roots, "--locks", redis_secure.tls, *TINY]
    commands = {
        "run": ["run", "--json", *config],
        "run again": ["run", "--json", *config],
        "status": ["status", "--json", *config],
        "history": ["history", "--json", *store],
        "predict": ["predict", "--json", str(source / "t10k-images-idx3-ubyte.gz"), *store],
        "sweep": ["sweep", "--json", "--grid", "hidden_units=16,24", "--dask-workers", "1", *config],
        "gc": ["gc", "--json", *config],
    }
    outputs: dict[str, str] = {}
    for name, args in commands.items():
        result = run_cli(env, args)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        outputs[f"{name}: stdout"], outputs[f"{name}: stderr"] = result.stdout, result.stderr
    first, again = json.loads(outputs["run: stdout"]), json.loads(outputs["run again: stdout"])
    assert {info["state"] for info in first["stages"].values()} == {"completed"}
    assert {info["state"] for info in again["stages"].values()} == {"cached"}
    assert [row["state"] for row in json.loads(outputs["sweep: stdout"])["trials"]] == ["cached", "trained"]
    assert json.loads(outputs["predict: stdout"])["images"] == 50

    # A served deployment: its parameters are stored by the server too.
    with open(tmp_path / "serve.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *config], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not api_records(prefect_server.api)["deployments"]:
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        stop_process(serve)

    records = api_records(prefect_server.api)
    runs = [run for run in records["flow_runs"]  # this test's (the server is the module's), not the served schedule's
            if run["deployment_id"] is None and bucket in json.dumps(run["parameters"])]
    assert len(runs) == 4 and records["logs"] and records["artifacts"] and records["events"]
    # The lock URL is a parameter of each run, its password hidden; the served deployment has none (its process's env).
    redacted = f"rediss://:***@127.0.0.1:{redis_secure.tls_port}/0?ssl_ca_certs="
    assert all(run["parameters"]["config"]["locks"].startswith(redacted) for run in runs)
    (deployment,) = records["deployments"]
    assert "locks" not in deployment["parameters"]["config"]

    objects = {}
    for page in s3_https.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            body = s3_https.client.get_object(Bucket=bucket, Key=entry["Key"])["Body"]
            objects[f"s3://{bucket}/{entry['Key']}"] = body.read()
    assert len(objects) > 50
    # Everything this machine kept (its PREFECT_HOME, temp folder, the serve log) and the Prefect server's folder
    # (its database, its log) as bytes; every output; every object; every record the server's API gives.
    places = {**files_under(tmp_path, prefect_server.home), **objects,
              **{name: text.encode() for name, text in outputs.items()},
              **{f"Prefect API {kind}": json.dumps(items).encode() for kind, items in records.items()}}
    assert any(name.endswith(".db") for name in places)  # the server's SQLite database is searched too
    leaks = [f"{what} in {where}" for where, content in places.items() for what, secret in SECRETS.items()
             if secret.encode() in content]
    assert leaks == []
