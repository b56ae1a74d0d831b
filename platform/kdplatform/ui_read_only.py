"""`kdplatform ui --read-only`: MLflow's own UI server with its write endpoints refused (HTTP 403).

MLflow has no read-only switch, so this module is the server's app: `mlflow ui --app-name kdp-read-only`
(MLflow's own CLI, host check and uvicorn workers) with `create_app` registered under that name for this
process only. The app is MLflow's FastAPI app wrapped in `ReadOnly`, which lets through what only reads:
GET/HEAD/OPTIONS, POSTs to search endpoints (the UI lists runs with POST .../runs/search) and GraphQL
queries (the run page's metric history), and answers 403 to everything else (create, update, delete, log).

Run as `python -m kdplatform.ui_read_only <mlflow ui options>`; `ui_server.serve` does.
"""

from __future__ import annotations

import json
import re
import sys

APP_NAME = "kdp-read-only"
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
MUTATION = re.compile(r"\bmutation\b")
REFUSED = json.dumps({"error_code": "PERMISSION_DENIED",
                      "message": "this MLflow UI is read-only (kdplatform ui --read-only)"}).encode()


def is_read(method: str, path: str, body: bytes = b"") -> bool:
    """Whether a request only reads: GET-like, a POST to a .../search endpoint, or a GraphQL query."""
    if method in READ_METHODS:
        return True
    if method != "POST":
        return False
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last == "search" or last.startswith("search-"):
        return True
    if last == "graphql":
        try:
            query = json.loads(body or b"{}").get("query", "")
        except (ValueError, AttributeError):
            return False
        return isinstance(query, str) and not MUTATION.search(query)
    return False


class ReadOnly:
    """ASGI middleware: requests that would write get 403 before they reach MLflow."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        body, messages = b"", []
        if method == "POST" and path.rstrip("/").endswith("graphql"):  # the query decides: read the body first
            while True:
                message = await receive()
                messages.append(message)
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        if not is_read(method, path, body):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": REFUSED})
        if messages:
            async def replay():
                return messages.pop(0) if messages else await receive()
            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def create_app():
    """The app factory MLflow's uvicorn workers call (MLflow's FastAPI app, read-only)."""
    from mlflow.server.fastapi_app import app

    return ReadOnly(app)


def main(argv: list[str]) -> None:
    """`mlflow ui <argv> --app-name kdp-read-only`, with our app known to MLflow's app lookup."""
    from importlib.metadata import EntryPoint

    import mlflow.utils.plugins as plugins

    found = plugins.get_entry_points

    def with_ours(group: str):
        extra = [EntryPoint(APP_NAME, "kdplatform.ui_read_only:create_app", group)] if group == "mlflow.app" else []
        return list(found(group)) + extra

    plugins.get_entry_points = with_ours  # before mlflow.cli builds its --app-name choices
    import mlflow.server
    from mlflow.cli import cli

    mlflow.server.get_entry_points = with_ours  # the server's own lookup of the name

    cli.main(["ui", *argv, "--app-name", APP_NAME], prog_name="mlflow")


if __name__ == "__main__":  # pragma: no cover - the UI's child process
    main(sys.argv[1:])
