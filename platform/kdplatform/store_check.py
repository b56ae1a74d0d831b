"""Is the tracking store usable? Checked once before any work, so a bad store fails in seconds with one line.

`check_store(uri, write=...)` raises `StoreUnusable` (a user error: exit 2) for a server that does not answer
or refuses the credentials, a database URI whose Python driver is missing, a SQLite file that is not a
database, is damaged, or is some other program's database (MLflow would add its tables to it), and, for the
commands that write (`write=True`: run, sweep, teacher), a SQLite store on a read-only file or folder (SQLite's
journal and kdplatform's claim files live beside it). Every command that opens a store calls it first; it
only reads, and never creates a store: a SQLite file that does not exist yet is fine when its folder can hold
it (the first run creates it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from kdplatform import tracking

PROBE_TIMEOUT_S = 10  # one request to a server; a closed port answers at once, a black hole takes this long
SQLITE_MAGIC = b"SQLite format 3\x00"
# Python module a SQLAlchemy dialect imports -> what to `pip install` for it.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "pyodbc": "pyodbc", "pymssql": "pymssql", "pg8000": "pg8000",
                   "asyncpg": "asyncpg"}


class StoreUnusable(ValueError):
    """The tracking store cannot be used; the message names the store and the fix."""


def check_store(uri: str, write: bool = True) -> None:
    """Raise StoreUnusable unless `uri` (absolute, from `tracking.absolute_uri`) can be read, and written
    when `write`."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        _check_sqlite(uri, write)
    elif scheme in ("postgresql", "mysql", "mssql"):
        _check_driver(uri, scheme)
        _probe_database(uri, scheme)
    elif scheme in ("http", "https"):
        _probe(uri, "the tracking server")
    elif scheme == "file":
        folder = Path(uri[len("file://"):])
        if folder.exists() and not folder.is_dir():
            raise StoreUnusable(f"the tracking store {folder} is a file, not a folder.\n"
                                "  fix: pass --tracking-uri sqlite:///<path>/mlflow.db or a folder")


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (None for an in-memory or another kind of store)."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _check_sqlite(uri: str, write: bool = True) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    if path.exists() and not path.is_file():
        raise StoreUnusable(f"the tracking store {path} is a folder, not an SQLite file.\n"
                            f"  fix: pass --tracking-uri sqlite:///{path}/mlflow.db (a file inside it)")
    if not path.exists():
        if not path.parent.is_dir():
            raise StoreUnusable(f"the folder of the tracking store {path} does not exist.\n"
                                f"  fix: create {path.parent} or pass another --tracking-uri")
        if not os.access(path.parent, os.W_OK):
            raise StoreUnusable(f"cannot create the tracking store {path}: its folder is not writable.\n"
                                "  fix: pass a --tracking-uri in a folder you can write")
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise StoreUnusable(f"cannot read the tracking store {path} ({e.strerror}).\n"
                            "  fix: give yourself read access to it, or pass another --tracking-uri") from None
    problem, tables = None, set()
    if head and head != SQLITE_MAGIC:  # an empty file is a valid empty database
        problem = "it is not an SQLite database"
    else:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
                db.execute("PRAGMA quick_check(1)").fetchall()
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            problem = f"SQLite cannot read it ({e})"
    if problem:
        raise StoreUnusable(f"the tracking store {path} is unusable: {problem}.\n"
                            f"  fix: move it aside (mv {path} {path}.broken) to start a new store, or restore it "
                            "from a backup")
    if tables and not {"experiments", "runs"} <= tables:
        raise StoreUnusable(f"{path} is an SQLite database but not an MLflow store (its tables: "
                            f"{', '.join(sorted(tables)[:5])}); MLflow would add its own tables to it.\n"
                            "  fix: pass --tracking-uri sqlite:///<path>/mlflow.db for a new file, or the store "
                            "your runs were logged to")
    if write:
        _check_sqlite_writable(path)


def _check_sqlite_writable(path: Path) -> None:
    """SQLite writes a journal beside the file, and kdplatform its claim files (`<db>.kdp-claims/`)."""
    claims = path.with_name(path.name + ".kdp-claims")
    blocked = next((p for p in (path, path.parent, claims) if p.exists() and not os.access(p, os.W_OK)), None)
    if blocked is not None:
        raise StoreUnusable(f"the tracking store {path} is read-only ({blocked} cannot be written: SQLite's "
                            "journal and kdplatform's claim files go beside the store).\n"
                            f"  fix: copy it to a folder you can write (cp {path} <folder>/) and pass "
                            "--tracking-uri sqlite:///<folder>/" + path.name + "; `ls` and `report` read it as is")


def _check_driver(uri: str, scheme: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ModuleNotFoundError as e:
        module = (e.name or "?").split(".")[0]
        package = DRIVER_PACKAGES.get(module, module)
        raise StoreUnusable(f"the tracking URI {tracking.redact(uri)} needs the Python database driver "
                            f"'{module}', which is not installed.\n  fix: pip install {package} "
                            f"(or name an installed driver in the scheme, e.g. {scheme}+<driver>://)") from None
    except Exception as e:  # noqa: BLE001 - an unknown dialect name
        raise StoreUnusable(f"the tracking URI {tracking.redact(uri)} names no database driver SQLAlchemy "
                            f"knows ({e}).\n  fix: use postgresql://, mysql://, mssql:// or sqlite:///") from None


def _probe_database(uri: str, scheme: str) -> None:
    """One connection through SQLAlchemy (MLflow's own engine creation retries for about 100 s)."""
    import sqlalchemy

    args = {"connect_timeout": PROBE_TIMEOUT_S} if scheme in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    except Exception as e:  # noqa: BLE001 - refused, unknown host, bad password: all told the same way
        raise StoreUnusable(_explain(uri, "the database", e)) from None
    finally:
        engine.dispose()


def _probe(uri: str, what: str) -> None:
    """One read through MLflow's own client (its auth, TLS and proxy settings), with a short timeout."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    saved = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PROBE_TIMEOUT_S)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except (MlflowException, OSError, ConnectionError) as e:
        raise StoreUnusable(_explain(uri, what, e)) from None
    except Exception as e:  # noqa: BLE001 - e.g. a database that refuses the connection (sqlalchemy errors)
        raise StoreUnusable(_explain(uri, what, e)) from None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_TIMEOUT", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = saved


def _explain(uri: str, what: str, e: Exception) -> str:
    shown = tracking.redact(uri)
    text = tracking.redact(str(e))
    code = getattr(e, "error_code", "") or ""
    status = getattr(e, "get_http_status_code", lambda: None)()
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or status in (401, 403) or \
            any(f"{c} " in text or f"status code {c}" in text for c in (401, 403)):
        return (f"{what} at {shown} refused the credentials ({_first_line(text)}).\n"
                "  fix: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                "for an account of that server")
    return (f"cannot use {what} at {shown}: {_first_line(text)}.\n"
            "  fix: start it or correct --tracking-uri / MLFLOW_TRACKING_URI (a local store needs no server: "
            "sqlite:///mlflow.db)")


def _first_line(text: str, limit: int = 300) -> str:
    reasons = [m for m in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                           "password authentication failed", "does not exist") if m in text]
    line = reasons[0] if reasons else next((ln.strip() for ln in text.splitlines() if ln.strip()), "no answer")
    return line[:limit].rstrip(".")
