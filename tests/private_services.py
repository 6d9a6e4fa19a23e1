"""Private broker instances with their own TLS listeners, for the TLS tests.

The shared services (RabbitMQ 5672, Redis 6379, NATS 4222, Mosquitto 1883) are never
reconfigured: each test module that needs a broker's real TLS listener starts its own instance
here, with its own configuration, free ports and a data directory under /tmp, and stops it and
removes the directory afterwards, also when a test failed or the instance never came up.

Each instance listens on 127.0.0.1 with TLS (the relay's port) and, where the broker allows a
second listener, in plaintext too (``plain_port``): only the tests use that one, to see what
arrived. NATS has a single client port, so its tests read over TLS as well.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.conftest import wait_until
from tests.faults import free_port
from tests.tls_support import Leaf

# Long enough for a RabbitMQ node on a busy two-core CI machine (about 5 s when idle).
START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class ServerTls:
    """What a server presents and whom it trusts: ``leaf`` signed by the CA in ``ca``;
    ``client_cert_required``: a client without a certificate signed by ``ca`` is refused
    (else a client certificate is optional, and verified when given)."""

    leaf: Leaf
    ca: Path
    client_cert_required: bool = False


class PrivateServer:
    """One broker process in its own session (so it and its children stop together), its
    output in ``directory/output.log``."""

    def __init__(
        self,
        name: str,
        directory: Path,
        command: list[str],
        *,
        tls_port: int,
        plain_port: int | None = None,
        env: dict[str, str] | None = None,
        log_files: tuple[str, ...] = ("output.log",),
    ) -> None:
        self.name = name
        self.directory = directory
        self.command = command
        self.tls_port = tls_port
        self.plain_port = plain_port
        self.env = {**os.environ, **(env or {})}
        self.log_files = log_files
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateServer:
        with (self.directory / "output.log").open("ab") as output:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self) -> PrivateServer:
        """Until every port accepts connections; a process that exits first fails the test
        with its log."""

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}")
            ports = [self.tls_port] + ([self.plain_port] if self.plain_port else [])
            return all(_port_open(port) for port in ports)

        try:
            wait_until(ready, timeout=START_TIMEOUT, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"private {self.name}: {exc}\n{self.log()}") from None
        return self

    def log(self) -> str:
        texts = []
        for pattern in self.log_files:
            for path in sorted(self.directory.rglob(pattern)):
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def stop(self) -> None:
        """SIGTERM (each broker shuts down cleanly on it), SIGKILL to the whole session if it
        lingers, then the directory goes."""
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=STOP_TIMEOUT)
            if process is not None:
                # Children of the session (RabbitMQ's beam) outlive a script killed first.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _directory(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"outbox-relay-{name}-", dir="/tmp"))


# -- the brokers ------------------------------------------------------------------------------------


# Debian's package: the script itself, not /usr/sbin's wrapper that switches to the rabbitmq user.
_RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def rabbitmq(tls: ServerTls) -> PrivateServer:
    """A RabbitMQ node of its own (name, Erlang distribution port, Mnesia, logs, config,
    plugins, cookie), with an ``amqps`` listener verifying peers against ``tls.ca`` and a
    plaintext one for the tests. Runs as the current user (the packaged wrapper would switch to
    the ``rabbitmq`` user, who cannot read the test's files)."""
    directory = _directory("rabbitmq")
    tls_port, plain_port, dist_port = free_port(), free_port(), free_port()
    config = directory / "rabbitmq.conf"
    config.write_text(
        f"listeners.tcp.default = 127.0.0.1:{plain_port}\n"
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {tls.ca}\n"
        f"ssl_options.certfile = {tls.leaf.cert}\n"
        f"ssl_options.keyfile = {tls.leaf.key}\n"
        "ssl_options.verify = verify_peer\n"
        f"ssl_options.fail_if_no_peer_cert = {str(tls.client_cert_required).lower()}\n"
        "loopback_users = none\n"
    )
    (directory / "enabled_plugins").write_text("[].\n")
    (directory / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
    node = f"outbox-tls-{directory.name.rsplit('-', 1)[-1]}@localhost"
    env = {
        "HOME": str(directory),  # Erlang keeps the node's cookie there
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(plain_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(directory / "rabbitmq.pid"),
    }
    return PrivateServer(
        "RabbitMQ",
        directory,
        [_RABBITMQ_SERVER if Path(_RABBITMQ_SERVER).exists() else "rabbitmq-server"],
        tls_port=tls_port,
        plain_port=plain_port,
        env=env,
        log_files=("*.log",),  # its own logs under log/ too
    )


def redis(tls: ServerTls) -> PrivateServer:
    directory = _directory("redis")
    tls_port, plain_port = free_port(), free_port()
    command = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(plain_port),
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(tls.leaf.cert), "--tls-key-file", str(tls.leaf.key),
        "--tls-ca-cert-file", str(tls.ca),
        "--tls-auth-clients", "yes" if tls.client_cert_required else "optional",
        "--save", "", "--appendonly", "no", "--dir", str(directory),
    ]  # fmt: skip
    return PrivateServer("Redis", directory, command, tls_port=tls_port, plain_port=plain_port)


def nats(tls: ServerTls) -> PrivateServer:
    """nats-server with JetStream; its one client port speaks TLS (after the plaintext INFO
    that says ``tls_required``, as every NATS server with TLS does)."""
    directory = _directory("nats")
    tls_port = free_port()
    config = directory / "nats.conf"
    config.write_text(
        f"listen: 127.0.0.1:{tls_port}\n"
        f'jetstream {{ store_dir: "{directory / "jetstream"}" }}\n'
        "tls {\n"
        f'  cert_file: "{tls.leaf.cert}"\n'
        f'  key_file: "{tls.leaf.key}"\n'
        f'  ca_file: "{tls.ca}"\n'
        f"  verify: {str(tls.client_cert_required).lower()}\n"
        "  timeout: 5\n"
        "}\n"
    )
    return PrivateServer("NATS", directory, ["nats-server", "-c", str(config)], tls_port=tls_port)


def mosquitto(tls: ServerTls) -> PrivateServer:
    directory = _directory("mosquitto")
    tls_port, plain_port = free_port(), free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        "per_listener_settings true\n"
        "persistence false\n"
        "log_dest stderr\n"
        # Started as root, Mosquitto would drop to the mosquitto user, who cannot read the keys.
        f"user {getpass.getuser()}\n"
        f"listener {plain_port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"cafile {tls.ca}\n"
        f"certfile {tls.leaf.cert}\n"
        f"keyfile {tls.leaf.key}\n"
        f"require_certificate {str(tls.client_cert_required).lower()}\n"
    )
    return PrivateServer(
        "Mosquitto",
        directory,
        ["mosquitto", "-c", str(config)],
        tls_port=tls_port,
        plain_port=plain_port,
    )


class PrivateServers:
    """Starts servers, all at once (a RabbitMQ node boots in seconds of mostly waiting), and
    stops every one of them on ``close()``, whatever happened in between."""

    def __init__(self) -> None:
        self._started: list[PrivateServer] = []

    def start(self, *servers: PrivateServer) -> tuple[PrivateServer, ...]:
        for server in servers:
            self._started.append(server)
            server.start()
        for server in servers:
            server.wait_ready()
        return servers

    def close(self) -> None:
        errors: list[BaseException] = []
        for server in reversed(self._started):
            try:
                server.stop()
            except BaseException as exc:  # stop the others all the same
                errors.append(exc)
        self._started.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> PrivateServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
