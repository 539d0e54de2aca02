"""The artifact: the wheel built from this checkout, installed by `deploy/wheel.sh` (the
Dockerfile's own steps) into a clean virtualenv outside the checkout by a non-root user,
runs `migrate`, `run`, a release and `doctor` against the real servers.

pip installs offline from a wheelhouse kept in the machine's cache directory
(~/.cache/cart-release-worker/wheelhouse, shared by every clone): the first run on a
machine, or after a dependency changed, fills it with one `pip download`; other runs do
not touch the network.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Servers
from tests.support import http_get, isolated_settings, read_results
from worker.testing.embedded import free_port
from worker.testing.environment import settings_env
from worker.testing.topics import ensure_topics

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
WHEELHOUSE = CACHE / "cart-release-worker" / "wheelhouse"
USER = "nobody"


def _ids() -> tuple[int, int]:
    entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def _run(
    args: list[str], env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )


def as_user(args: list[str]) -> list[str]:
    """`args` run as the unprivileged user (the tests run as root in CI)."""
    if os.geteuid() != 0:
        return args
    uid, gid = _ids()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *args]


USABLE_PYTHON = "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"


def user_python() -> str:
    """A Python 3.11+ with venv that the unprivileged user may run (a pyenv build under
    root's home is not one): this interpreter's base, or the system's python3."""
    base = getattr(sys, "_base_executable", sys.executable)
    for candidate in (base, shutil.which("python3", path="/usr/bin:/bin")):
        if candidate is None:
            continue
        probe = _run(
            # Through env: setpriv's own exec may still reach root-only paths, its children not.
            as_user(["env", candidate, "-c", USABLE_PYTHON]),
            {"PATH": "/usr/bin:/bin"},
        )
        if probe.returncode == 0:
            return candidate
    raise AssertionError(
        f"no Python 3.11+ with venv and ensurepip that {USER} can run "
        "(install python3-venv, or a Python outside root's home)"
    )


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A directory outside the checkout, owned by the unprivileged user: HOME, venv, cache."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="wheel-test-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(root, *_ids())
    yield root
    shutil.rmtree(root, ignore_errors=True)


def offline(wheelhouse: Path = WHEELHOUSE) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}


def fill_wheelhouse(wheel: Path) -> None:
    """Download the wheel's dependencies and the build backend (the one network use)."""
    wanted = [str(wheel), "setuptools>=69", "wheel"]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    filled = _run([*pip, "--dest", str(WHEELHOUSE), *wanted], os.environ, timeout=300)
    # pip saves the project's wheel there too; a copy left from an earlier fill has the same
    # file name, and pip would resolve the dependencies from its stale metadata next time.
    (WHEELHOUSE / wheel.name).unlink(missing_ok=True)
    assert filled.returncode == 0, filled.stderr


def readable_copy(target: Path) -> Path:
    """The wheelhouse copied where the unprivileged user can read it (a cache under
    root's home is not readable by others)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(WHEELHOUSE, target)
    for path in [target, *target.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def assert_wheel_contents(wheel: Path) -> None:
    """Every module of worker/ (a new subpackage must be listed in pyproject.toml) and every
    migration are in the wheel; the bench harness and the tests are not."""
    with zipfile.ZipFile(wheel) as archive:
        names = {n for n in archive.namelist() if not n.startswith("cart_release_worker-")}
    modules = {p.relative_to(CHECKOUT).as_posix() for p in (CHECKOUT / "worker").rglob("*.py")}
    migrations = {f"worker/migrations/{p.name}" for p in (CHECKOUT / "migrations").glob("*.sql")}
    assert modules - names == set(), "modules missing from the wheel"
    assert migrations - names == set(), "migrations missing from the wheel"
    assert {n.split("/")[0] for n in names} == {"worker"}, sorted(names)


def build_context(target: Path) -> Path:
    """What the Dockerfile copies into its build stage, and nothing else: the wheel is built
    from these files alone, without the checkout's leftovers (build/, egg-info)."""
    ignore = shutil.ignore_patterns("__pycache__")
    (target / "deploy").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "deploy/wheel.sh"):
        shutil.copy2(CHECKOUT / name, target / name)
    for name in ("worker", "migrations"):
        shutil.copytree(CHECKOUT / name, target / name, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def installed(scratch: Path) -> Path:
    """Build the wheel (as CI's user) and install it as the unprivileged user; the venv's bin."""
    dist = scratch / "dist"
    source = build_context(scratch / "src")
    build_env = {**os.environ, "PYTHON": sys.executable}
    # The copy's script: the unprivileged user may not be able to read the checkout.
    wheel_sh = str(source / "deploy" / "wheel.sh")
    build = [wheel_sh, "build", str(source), str(dist)]
    filled = any(WHEELHOUSE.glob("setuptools-*.whl"))
    # Offline once the wheelhouse holds the build backend; from the index the first time.
    built = _run(build, {**build_env, **offline()} if filled else build_env)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("cart_release_worker-*.whl")
    assert_wheel_contents(wheel)
    dist.chmod(0o755)
    wheel.chmod(0o644)

    venv = scratch / "venv"
    install_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(scratch),
        "PIP_CACHE_DIR": str(scratch / "pip-cache"),
        "PYTHON": user_python(),
        **offline(scratch / "wheelhouse"),
    }
    install = [*as_user(["sh", wheel_sh, "install", str(venv), str(wheel)])]
    if not filled:
        fill_wheelhouse(wheel)
    readable_copy(scratch / "wheelhouse")
    done = _run(install, install_env)
    if done.returncode != 0 and filled:  # a dependency changed since the wheelhouse filled
        fill_wheelhouse(wheel)
        readable_copy(scratch / "wheelhouse")
        shutil.rmtree(venv, ignore_errors=True)
        done = _run(install, install_env)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv / "bin"


@pytest.fixture
async def fresh_database(servers: Servers, db: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    """A database of its own, not migrated: (owner URL, worker login URL); dropped after."""
    name = f"wheel_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE DATABASE {name}")
    owner = servers.database_url.rpartition("/")[0] + "/" + name
    login = servers.worker_database_url.rpartition("/")[0] + "/" + name
    yield owner, login
    await db.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_the_installed_wheel_migrates_runs_releases_and_passes_doctor(
    servers: Servers, installed: Path, scratch: Path, fresh_database: tuple[str, str]
) -> None:
    owner_url, worker_url = fresh_database
    command = str(installed / "release-worker")
    base = {"PATH": f"{installed}:/usr/bin:/bin", "HOME": str(scratch), "LC_ALL": "C.UTF-8"}

    async def cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_run, as_user([command, *args]), {**base, **env}, 60)

    # The command runs outside the checkout: it cannot pick up the source tree.
    where = await cli("--help", env={})
    assert where.returncode == 0, where.stderr
    assert not str(installed).startswith(str(CHECKOUT))
    # The api's modules (the image's `api` command) import with the wheel's dependencies.
    api = await asyncio.to_thread(
        _run, as_user([str(installed / "python"), "-c", "import worker.api.server"]), base, 60
    )
    assert api.returncode == 0, api.stderr
    # The bench harness stays in the checkout, and the command says so.
    bench = await cli("bench", "--quick", env={})
    assert bench.returncode == 2, bench.stderr
    assert "make bench" in bench.stderr

    migrated = await cli("migrate", env={"WORKER_DATABASE_URL": owner_url})
    assert migrated.returncode == 0, migrated.stderr
    assert "Applying: 20261127000001_shared_tables.sql" in migrated.stdout

    added = await cli("partner", "add", "wheel-partner", env={"WORKER_DATABASE_URL": owner_url})
    assert added.returncode == 0, added.stderr
    api_key = added.stdout.strip().splitlines()[-1]
    conn = await asyncpg.connect(owner_url)
    try:
        await conn.execute("INSERT INTO stock (sku, on_hand, reserved) VALUES ('sku-w', 10, 3)")
        await conn.execute(
            """
            INSERT INTO reservations (reservation_id, partner_id, cart_id, cart_item_id, sku,
                                      quantity, status, expires_at)
            VALUES ('res-w', 'wheel-partner', 'cart-w', 'item-w', 'sku-w', 3, 'reserved',
                    now() + interval '1 hour')
            """
        )
    finally:
        await conn.close()

    settings = isolated_settings(worker_url, servers.bootstrap)
    await ensure_topics(settings, 1)
    port = free_port()
    worker_env = settings_env(settings, metrics_port=port)
    log = scratch / "run.log"
    with log.open("wb") as out:
        worker = await asyncio.create_subprocess_exec(
            *as_user([command, "run"]), env={**base, **worker_env}, stdout=out, stderr=out
        )
    try:
        emitted = await cli(
            "emit", "--cart", "cart-w", "--api-key", api_key, "--item", "item-w=res-w",
            env=worker_env,
        )  # fmt: skip
        assert emitted.returncode == 0, emitted.stderr
        results = await read_results(settings, 1, timeout_s=45)
        assert [r.body["outcome"] for r in results] == ["released"], log.read_text()
        assert results[0].body["quantity"] == 3

        status, body = await asyncio.to_thread(http_get, port, "/metrics")
        assert status == 200
        assert 'release_worker_items_total{outcome="released"} 1.0' in body

        doctor = await cli("doctor", env=worker_env)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "All " in doctor.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), 60)
    assert code == 0, log.read_text()
