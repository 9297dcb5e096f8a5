# --- InterCode-SQL server (tests marked `mysql`) -------------------------------------------------------------------
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """URL of the local MariaDB from scripts/start_mysql.sh (started, and the Spider dump loaded, if needed)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "start_mysql.sh"
    done = subprocess.run([str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"scripts/start_mysql.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def private_mysql():
    """(url, env) of a server of the test module's own; see tests/private_mysql.py."""
    from tests.private_mysql import private_server

    with private_server() as server:
        yield server
