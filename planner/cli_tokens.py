"""API token commands of the ``allot`` CLI: create, list and revoke the REST API's bearer tokens.

    allot token create NAME --owner USER --scope read|write [--max-concurrent N]   (prints the secret once)
    allot token list
    allot token revoke NAME

Only a token's sha256 is stored (``workers.tokens``), so a lost secret cannot be shown again: revoke the
token and create another. Registered on the main app by ``planner.cli``; errors end with one ``error:``
line and exit code 1.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphs.errors import AllotError
from planner.storage import SQLStorage, get_storage

__all__ = ["token_app"]

token_app = typer.Typer(help="Create, list and revoke REST API tokens.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

DatabaseOption = Annotated[
    str | None,
    typer.Option("--database", envvar="ALLOT_DATABASE_URL", help="SQLAlchemy URL; default: a SQLite file allot.db."),
]


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _store(database: str | None):  # type: ignore[no-untyped-def]
    from workers.tokens import TokenStore

    try:
        storage = get_storage(database)
    except AllotError as exc:
        raise _fail(str(exc)) from None
    if not isinstance(storage, SQLStorage):  # pragma: no cover - get_storage returns SQL for URLs
        raise _fail("tokens need an SQL database")
    return TokenStore(storage)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="A name for the token (unique; used to revoke it).")],
    owner: Annotated[str, typer.Option(help="The user the token acts for: its jobs are this owner's.")],
    scope: Annotated[
        str, typer.Option(help="read (read own jobs, tasks, studies, graphs) or write (also submit etc.).")
    ] = "read",
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="Most of this owner's jobs (submitted with it) that run at once.")
    ] = None,
    database: DatabaseOption = None,
) -> None:
    """Create a token and print its secret, once: only its hash is stored."""
    store = _store(database)
    try:
        token, secret = store.create(name, owner, scope, max_concurrent=max_concurrent)
    except AllotError as exc:
        raise _fail(str(exc)) from None
    limit = "" if token.max_concurrent is None else f", at most {token.max_concurrent} job(s) at once"
    err_console.print(
        f"token {escape(token.name)} for {escape(token.owner)} ({token.scope.value}{limit}); "
        "its secret follows and is not shown again:",
        highlight=False,
    )
    print(secret)  # plain stdout, so `SECRET=$(allot token create ...)` works


@token_app.command("list")
def token_list(database: DatabaseOption = None) -> None:
    """Tokens (never their secrets: those are not stored)."""
    table = Table("name", "owner", "scope", "max concurrent", "created", "revoked")
    for token in _store(database).list():
        table.add_row(
            escape(token.name),
            escape(token.owner),
            token.scope.value,
            "-" if token.max_concurrent is None else str(token.max_concurrent),
            f"{token.created_at:%Y-%m-%d %H:%M:%S}",
            "-" if token.revoked_at is None else f"{token.revoked_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    database: DatabaseOption = None,
) -> None:
    """Revoke a token: it is refused from now on."""
    try:
        token = _store(database).revoke(name)
    except (AllotError, KeyError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"token {escape(token.name)} of {escape(token.owner)} revoked")
