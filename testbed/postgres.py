"""A PostgreSQL server of the tests' own: Debian's `postgresql` (scripts/install-postgres
installs it when missing), a data directory in a temp dir, a free 127.0.0.1 port, trust
authentication for its one user; stopped and removed on exit, also on an exception.

    with Postgres() as pg:
        url = pg.database("keys")   # postgres://apikey@127.0.0.1:PORT/keys

PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user.
"""
import glob
import os
import pwd
import subprocess
import tempfile
from pathlib import Path

from testbed.harness import HOST, HarnessError, Service, _remove, free_port

USER = "apikey"


def bin_dir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise HarnessError("PostgreSQL not found: run scripts/install-postgres")
    return Path(found[-1]).parent


class Postgres(Service):
    def __init__(self):
        self.tmp = None
        self.started = False

    def _as_server_user(self, argv):
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *map(str, argv)]
        return list(map(str, argv))

    def _run(self, argv, timeout=60):
        done = subprocess.run(self._as_server_user(argv), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise HarnessError(f"{' '.join(map(str, argv))}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="apikey-postgres-"))
        self.data = self.tmp / "data"
        if os.geteuid() == 0:
            server = pwd.getpwnam("postgres")
            os.chown(self.tmp, server.pw_uid, server.pw_gid)
        pg = bin_dir()
        self._run([pg / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        self.port = free_port()
        options = f"-p {self.port} -k {self.tmp} -c listen_addresses={HOST} -c fsync=off"
        self._run([pg / "pg_ctl", "-D", self.data, "-l", self.tmp / "postgres.log", "-o", options,
                   "-w", "-t", "30", "start"])
        self.started = True
        return self

    def psql(self, sql, database="postgres"):
        return self._run([bin_dir() / "psql", "-h", HOST, "-p", self.port, "-U", USER, "-d", database,
                          "-v", "ON_ERROR_STOP=1", "-Atc", sql])

    def database(self, name):
        """A new, empty database: its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return f"postgres://{USER}@{HOST}:{self.port}/{name}"

    def close(self):
        if self.started:
            try:
                self._run([bin_dir() / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"])
            except HarnessError:
                pass
            self.started = False
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None
