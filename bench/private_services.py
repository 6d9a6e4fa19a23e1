"""A PostgreSQL cluster and a RabbitMQ node of the bench's own, to restart at will.

The shared services on this machine serve other engineers' tests: a bench that restarts them
breaks their runs. These start private instances on other ports, with their data under a temporary
directory, restart them as often as a fault soak asks, and stop and remove them on ``close()``
(the context manager's exit, also on Ctrl-C).

PostgreSQL: ``initdb`` into the directory (as the ``postgres`` user when running as root: initdb
refuses root), trust authentication on 127.0.0.1, ``wal_level=logical`` so ``--mode cdc`` works.
RabbitMQ: a node of its own name (``soak-<random>@localhost``), AMQP and distribution ports of its
own, its own database and log directories, no plugins (no management listener), run as the
``rabbitmq`` user (the Erlang cookie is that user's, so ``rabbitmqctl -n`` reaches the node).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, up: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while port_open(port) != up:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: port {port} still {'closed' if up else 'open'}")
        time.sleep(0.2)


def _as_user(user: str) -> list[str]:
    """A command prefix running as ``user`` when we are root (the servers refuse root)."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _give_to(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def postgres_bin() -> Path:
    """The newest installed server's bin directory (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


class PrivatePostgres:
    """``with PrivatePostgres(workdir) as pg: pg.admin_url; pg.restart()``."""

    USER = "postgres"

    def __init__(self, workdir: Path) -> None:
        self._bin = postgres_bin()
        self._dir = workdir / "postgres"
        self._data = self._dir / "data"
        self._log = self._dir / "server.log"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run(
            [*_as_user(self.USER), *args],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self._data), "-l", str(self._log), "-w",
            *extra, action,
        )  # fmt: skip

    def start(self) -> PrivatePostgres:
        self._dir.mkdir(parents=True)
        _give_to(self._dir, self.USER)
        self._run(
            str(self._bin / "initdb"), "-D", str(self._data), "-U", "postgres", "-A", "trust",
            "--no-sync",
        )  # fmt: skip
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self._dir}'\n"
                "wal_level = logical\n"
                "max_connections = 200\n"
                "max_replication_slots = 10\n"
                "max_wal_senders = 10\n"
            )
        self._pg_ctl("start")
        return self

    def restart(self) -> None:
        """A fast shutdown (every session cut, as a failover or an upgrade does) and a start."""
        self._pg_ctl("restart", "-m", "fast")

    def close(self) -> None:
        if (self._data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRabbitMQ:
    """``with PrivateRabbitMQ(workdir) as rabbit: rabbit.url; rabbit.restart()``."""

    USER = "rabbitmq"
    SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the package's wrapper would log to /var

    def __init__(self, workdir: Path) -> None:
        self._dir = workdir / "rabbitmq"
        self.port = free_port()
        self._dist_port = free_port()
        self.node = f"soak-{os.getpid()}-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self._process: subprocess.Popen[bytes] | None = None

    def _environment(self) -> dict[str, str]:
        home = pwd.getpwnam(self.USER).pw_dir if os.geteuid() == 0 else os.environ["HOME"]
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self._dist_port),
            "RABBITMQ_MNESIA_BASE": str(self._dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self._dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self._dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self._dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self._dir / "pid"),
        }

    def start(self) -> PrivateRabbitMQ:
        if not self._dir.exists():
            for sub in ("", "mnesia", "log"):
                (self._dir / sub).mkdir(parents=True, exist_ok=True)
                _give_to(self._dir / sub, self.USER)
            # guest may connect over 127.0.0.1 (the default already allows loopback); no plugins.
            (self._dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\n")
            (self._dir / "enabled_plugins").write_text("[].\n")
        output = (self._dir / "server.out").open("ab")
        self._process = subprocess.Popen(
            [*_as_user(self.USER), "env", *(f"{k}={v}" for k, v in self._environment().items()),
             self.SERVER],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as one, not by Ctrl-C
        )  # fmt: skip
        output.close()
        try:
            _wait_port(self.port, up=True, timeout=120, what=f"RabbitMQ node {self.node}")
        except RuntimeError:
            self._kill()
            raise
        return self

    def stop(self) -> None:
        """A clean shutdown (connections closed by the broker, as in a rolling restart)."""
        if self._process is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(
                [*_as_user(self.USER), "env", f"HOME={self._environment()['HOME']}",
                 "/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, "stop"],
                timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._kill()
        self._process = None
        _wait_port(self.port, up=False, timeout=30, what=f"RabbitMQ node {self.node}")

    def restart(self) -> None:
        self.stop()
        self.start()

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
        self._process = None

    def close(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass
        finally:
            self._kill()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PrivateRabbitMQ:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
