"""Throwaway PostgreSQL and Redis servers for tests: Debian's binaries (``make services`` installs
them), a temp dir of their own, 127.0.0.1 on a free port; stopped and removed by ``stop()``.

PostgreSQL refuses to run as root, so under root initdb and postgres run as the ``postgres`` system
user that Debian's package creates (``Popen(user=...)``: no wrapper process that would turn our
signals into a SIGKILL of the postmaster)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MissingServer", "Server", "empty_redis", "scale_out_config", "start_postgres", "start_redis"]

PG_SUPERUSER = "stylebot"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 15.0
_PORT_TRIES = 3


class MissingServer(RuntimeError):
    """A server binary is not installed."""


@dataclass
class Server:
    """A running server: its URL, its process, and the temp dir that goes with it."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    root: Path
    stop_signal: int = signal.SIGTERM
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "server.log"

    def stop(self) -> None:
        """Ask the server to shut down (kill it after a timeout), then remove its dir."""
        try:
            _stop_process(self.process, self.stop_signal)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _stop_process(process: subprocess.Popen[bytes], sig: int) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(_STOP_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _wait_ready(server: Server, ready: Callable[[Server], bool], what: str) -> bool:
    """True once ``ready()``; False if the process exited (e.g. the port was taken meanwhile)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        if ready(server):
            return True
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {_START_TIMEOUT_S:.0f} s; its log:\n"
                       f"{_log_tail(server.log)}")


def _start(make: Callable[[int, Path], Server], ready: Callable[[Server], bool], what: str,
           prefix: str) -> Server:
    """Start on a free port; try another port if the server exits before it is ready."""
    log = ""
    for _ in range(_PORT_TRIES):
        root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.geteuid() == 0 else None))
        try:
            server = make(_free_port(), root)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        try:
            if _wait_ready(server, ready, what):
                return server
        except BaseException:
            server.stop()
            raise
        log = _log_tail(server.log)
        server.stop()
    raise RuntimeError(f"{what} exited at start ({_PORT_TRIES} tries); its log:\n{log}")


# --- PostgreSQL -----------------------------------------------------------------------------------

def _pg_bindir() -> Path:
    """``$STYLEBOT_PG_BINDIR``, else the newest /usr/lib/postgresql/<version>/bin, else
    ``pg_config --bindir``."""
    if os.environ.get("STYLEBOT_PG_BINDIR"):
        return Path(os.environ["STYLEBOT_PG_BINDIR"])
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if found:
        return max(found, key=lambda p: [int(n) for n in p.parent.name.split(".") if n.isdigit()])
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                     check=True).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    raise MissingServer("PostgreSQL (initdb, postgres) is not installed: `make test` installs it "
                        "(make services: apt-get install postgresql)")


def _pg_user() -> dict[str, Any]:
    """Popen arguments that run the server as someone PostgreSQL accepts (not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise MissingServer("running as root, and there is no `postgres` system user to run PostgreSQL "
                            "as: `make test` installs Debian's postgresql package (make services), "
                            "which creates it") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _pg_chown(root: Path, as_user: dict[str, Any]) -> None:
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])


def _pg_ready(bindir: Path, port: int) -> bool:
    done = subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port),
                           "-U", PG_SUPERUSER, "-d", "postgres"], check=False)
    return done.returncode == 0


def start_postgres() -> Server:
    """initdb (trust auth, superuser ``stylebot``) and a postgres on 127.0.0.1; its asyncpg URL."""
    bindir = _pg_bindir()
    as_user = _pg_user()

    def make(port: int, root: Path) -> Server:
        _pg_chown(root, as_user)
        data, sockets, log = root / "data", root / "sock", root / "server.log"
        common: dict[str, Any] = {"cwd": root, "stdin": subprocess.DEVNULL, **as_user}
        with open(log, "ab") as out:
            init = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, "--auth=trust",
                 "--encoding=UTF8", "--locale=C", "--no-sync"],
                stdout=out, stderr=subprocess.STDOUT, check=False, **common)
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed ({init.returncode}); its log:\n{_log_tail(log)}")
            sockets.mkdir()
            _pg_chown(sockets, as_user)
            process = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(sockets), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, **common)
        # SIGINT is PostgreSQL's fast shutdown: roll back open transactions, close clients, exit.
        return Server(f"postgresql+asyncpg://{PG_SUPERUSER}@127.0.0.1:{port}/postgres", port, process,
                      root, stop_signal=signal.SIGINT)

    return _start(make, lambda s: _pg_ready(bindir, s.port), "PostgreSQL", "stylebot-pg-")


# --- Redis ----------------------------------------------------------------------------------------

def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis() -> Server:
    """A redis-server on 127.0.0.1, nothing persisted; its URL (database 0)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise MissingServer("redis-server is not installed: `make test` installs it "
                            "(make services: apt-get install redis-server)")

    def make(port: int, root: Path) -> Server:
        with open(root / "server.log", "ab") as out:
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(root)],
                cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        return Server(f"redis://127.0.0.1:{port}/0", port, process, root)

    return _start(make, lambda s: _redis_ready(s.port), "redis-server", "stylebot-redis-")


async def empty_redis(url: str) -> str:
    """``url``, its database emptied first (the tests share one server)."""
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


def scale_out_config(*, db_url: str, redis_url: str, **queue: int) -> str:
    """config.toml sections of a scale-out installation: PostgreSQL, the Redis queue, and any
    other ``[queue]`` keys."""
    extra = "".join(f"{key} = {value}\n" for key, value in queue.items())
    return (f'\n[storage]\nurl = "{db_url}"\n\n'
            f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"\n{extra}')
