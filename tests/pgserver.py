"""A real PostgreSQL server for the tests, started from Debian's binaries on 127.0.0.1.

``.ci/run`` installs the ``postgresql`` package (PostgreSQL 15 on Debian 12). ``initdb`` and
``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user on a data folder that
user owns (INSTALL.md). The server listens on 127.0.0.1 on a free port with ``trust`` authentication
and ``fsync=off`` (test data only), and is stopped at the end of the session.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Optional


def find_bin() -> Optional[Path]:
    """The newest ``/usr/lib/postgresql/<v>/bin`` holding initdb and pg_ctl (or ``pg_ctl`` on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """Start with :meth:`start`, get database URLs with :meth:`new_database`, :meth:`stop` at the end.

    Raises:
        RuntimeError: initdb or pg_ctl failed (their output is in the message).
    """

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="repsearch-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.version = ""

    def _run(self, *args: str) -> str:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        return proc.stdout

    def start(self) -> "PostgresServer":
        self.data.mkdir()
        if self.as_root:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        self.version = self._run("postgres", "--version").strip()
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        import psycopg2

        name = "t_" + uuid.uuid4().hex[:12]
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
