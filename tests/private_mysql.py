"""A MariaDB server of a test's own (own data dir and port, the poker_player database only), so a test may stop
and restart it without disturbing the shared server other tests use."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hpl_lightning.envs.intercode_sql import DEFAULT_DATA_DIR

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def poker_dump(path: Path) -> Path:
    """The dump's account setup and the poker_player database only: a private server loads it in a blink."""
    text = (DEFAULT_DATA_DIR / "ic_spider_dbs.sql").read_text()
    parts = text.split("CREATE DATABASE ")
    poker = next(p for p in parts[1:] if p.lstrip().startswith("IF NOT EXISTS `poker_player`"))
    path.write_text(parts[0] + "CREATE DATABASE " + poker)
    return path


def server_script(name: str, env: dict[str, str], *args: str) -> str:
    """Runs scripts/start_mysql.sh or stop_mysql.sh against the server ``env`` describes; returns stdout."""
    return subprocess.run([str(SCRIPTS / name), *args], env=env, check=True, capture_output=True, text=True).stdout


@contextmanager
def private_server() -> Iterator[tuple[str, dict[str, str]]]:
    """Yields (url, env for the scripts); stops the server and removes its files afterwards."""
    directory = tempfile.mkdtemp(prefix="hpl-mysql-test-", dir="/tmp")  # chowned to the server's user by the script
    dump = poker_dump(Path(tempfile.mkdtemp(prefix="hpl-dump-", dir="/tmp")) / "poker.sql")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HPL_MYSQL_DIR": directory, "HPL_MYSQL_PORT": str(port), "HPL_MYSQL_DUMP": str(dump)}
    try:
        yield server_script("start_mysql.sh", env).strip().splitlines()[-1], env
    finally:
        server_script("stop_mysql.sh", env, "--purge")
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(dump.parent, ignore_errors=True)
