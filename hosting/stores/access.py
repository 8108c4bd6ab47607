"""A session-store credential per sandbox, good for that sandbox's own sessions only.

Why: the gateway used to hand its own ``AGENT_SESSION_STORE`` URL to every sandbox,
so code running in one sandbox (the agent runs untrusted tool output) could read and
rewrite every tenant's transcripts. The trust boundaries (``DESIGN.md``) say a
sandbox holds "a store credential for its own session only". So the gateway, which
keeps the admin URL to itself, makes one store user per sandbox
(:meth:`SandboxStoreAccess.create`), hands the sandbox that user's URL, and widens
or narrows the user to the sessions the sandbox serves
(:meth:`SandboxStoreAccess.grant`). The adapters (:func:`open_session_store`) run
unchanged on such a URL: the store itself refuses everything else, so nothing in
the sandbox has to be trusted to stay in its lane.

User names are ``agent_sbx_<10 hex of sha256(installation)>_<sandbox id>``: unique
per installation when several share one store, always within Postgres's 63 bytes
(a 40-character sandbox id gives 61), and the prefix is what the Postgres policies
recognise a sandbox's role by. Ids are checked (:class:`ValueError`) before the
server is touched. No message raised here carries the admin URL or its password:
driver errors are re-raised as :class:`StoreAccessError` /
:class:`~hosting.errors.StoreUnavailable` with the secrets scrubbed and
without the driver's exception chained.

Redis (7.0 or newer; ACL selectors and read/write key permissions)
    One ACL user per sandbox: ``ACL SETUSER`` with ``resetkeys resetchannels -@all``,
    then exactly the commands the adapter sends (:data:`REDIS_COMMANDS`, plus
    ``client|setinfo`` on servers that know it, which redis-py sends on connect, and
    ``select`` when the admin URL names a database other than 0) and one key pattern
    per granted session, ``~agent:research-agent:<session id>:*``, which is every key
    of that session and nothing else. Redis checks the commands a Lua script runs,
    and their keys, against the caller's ACL (the fence script included), so
    ``EVALSHA`` grants nothing beyond the user's own rights; ``SCRIPT LOAD`` is
    there only because redis-py falls back to it when the script cache is empty.
    The project index (``agent:research-agent:sessions``, one set for every
    session) is reached only through a selector ``(%W~<index> +sadd)``: the user
    may add its session to it and nothing else. ``SMEMBERS``, ``SREM``, ``EXPIRE``
    or ``DEL`` on it are refused, so a sandbox can neither list the other sessions
    nor drop them from the index; the adapter notices the refusal and leaves the
    index's upkeep (TTL, removal on delete) to the listing, which prunes members
    whose session is gone (``redis_store`` module docstring). That first refusal
    shows in ``ACL LOG`` once per adapter instance; any other entry there from a
    sandbox user is worth a look.

    Residual risks: ``SADD``'s reply tells whether an id it names was already in
    the index, so a sandbox that can *guess* another session's id learns that the
    session exists (ids are UUIDv5 of installation, tenant and session name; it
    learns nothing of the content), and it can add junk ids (pruned when listed).
    Within its granted sessions the user has the adapter's full power, epoch key
    included: fencing stops an honest replaced sandbox, not a malicious one, so the
    gateway must take a session out of a sandbox's grant when the session moves.
    ACL key patterns hold in every database of the server: with a database other
    than 0 the user holds ``SELECT`` and reaches the same key names (its own
    session ids) in other databases too. Memory is not capped per user (set
    ``maxmemory``). Lua scripting is reachable (``EVALSHA``), so interpreter bugs
    of the Redis build are too. If the default user accepts connections without a
    password, none of this matters: :meth:`RedisSandboxAccess.prepare` warns.

    ACL users live in the server's memory. With an ``aclfile`` configured every
    change is followed by ``ACL SAVE``. Without one, a Redis restart (or a failover
    to a replica: ACLs are not replicated) forgets every sandbox user; the sandboxes
    then fail to authenticate (closed, not open) until the gateway creates and grants
    them again, and :meth:`~SandboxStoreAccess.sandboxes` no longer lists them.

PostgreSQL
    One ``LOGIN`` role per sandbox, member of a ``NOLOGIN`` group role per
    installation (``agent_sbx_<hash>``) that holds the table privileges the adapter
    needs and no more: ``SELECT, INSERT, DELETE`` on the entries table, the same
    plus ``UPDATE (mtime, summary)`` on transcripts and ``UPDATE (epoch, mtime)`` on
    epochs, ``SELECT`` on the grants table. Row-level security on all four tables:
    one policy each, which lets any role whose name does not start with
    ``agent_sbx_`` through as before, and a sandbox's role only to the rows of the
    sessions listed in its row of ``<table>_grants`` (role, project key, session id
    array; one row per role, so a grant replaces the earlier one in a single write).
    The grants table itself shows a sandbox only its own row. The policies are bound
    to table and function OIDs when created, so nothing a sandbox does to its
    ``search_path`` changes them (the owner, the admin, bypasses RLS as before). The
    sandbox role cannot create in the database or the schemas
    (:meth:`PostgresSandboxAccess.prepare` refuses to go on if PUBLIC could, as on
    PostgreSQL 14 and older by default, or if PUBLIC holds more than the adapter
    needs on the tables), cannot ``TRUNCATE`` (which would bypass RLS), ``ALTER`` or
    drop the tables, cannot write the grants, and cannot ``SET ROLE`` to anything
    but its group (which has no grants row, so sees nothing). What it can own
    (large objects, temporary tables) goes with ``DROP OWNED`` on delete. Its
    password reaches the server only as a SCRAM/MD5 verifier computed here, never
    in clear in a statement a log could keep. Each role has a connection limit
    (:data:`CONNECTION_LIMIT`).

    The admin role (the gateway's URL) needs ``CREATEROLE`` and must own the tables
    (it does when its adapter or :meth:`~PostgresSandboxAccess.prepare` created
    them); it makes itself a member of each sandbox role it creates, which is what
    lets it terminate the role's connections and ``DROP OWNED`` on delete without
    being a superuser.

    Residual risks: a sandbox may still connect to other databases of the cluster
    that grant ``CONNECT`` to PUBLIC (the default: revoke it, or restrict
    ``pg_hba.conf``), read the catalogs (role names, hence other sandbox ids), take
    advisory locks, hold an open transaction on the tables (which delays DDL), and
    see the entries' identity sequence advance. Within its granted sessions it has
    the adapter's full power (see Redis above on fencing). ``trust`` authentication
    in ``pg_hba.conf`` would make every password moot.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hosting.errors import StoreUnavailable

from . import MissingStoreDriver

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.sql import Composable

__all__ = [
    "CONNECTION_LIMIT",
    "PROJECT_KEY",
    "REDIS_COMMANDS",
    "USER_PREFIX",
    "PostgresSandboxAccess",
    "RedisSandboxAccess",
    "SandboxStoreAccess",
    "StoreAccessError",
    "UnknownSandbox",
    "open_sandbox_access",
    "sandbox_user",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

PROJECT_KEY = "research-agent"
"""The project key the server files every session under (``hosting.server.durable.STORE_PROJECT_KEY``;
a test keeps the two equal, so the store layer needs no import from the server)."""

USER_PREFIX = "agent_sbx_"
"""Every sandbox's store user (and Postgres group role) starts with this."""

CONNECTION_LIMIT = 16
"""Postgres connections per sandbox role: the adapter's pool (10) and ``ping``'s own, with room;
one sandbox cannot use up the server's ``max_connections``."""

REDIS_COMMANDS = (
    "ping",  # ping()
    "multi", "exec", "watch", "unwatch",  # the optimistic transactions (redis-py sends UNWATCH on reset)
    "time",  # the summary's mtime
    "get", "set", "del", "expire",
    "rpush", "lrange",  # transcripts
    "sadd", "srem", "smembers", "smismember",  # uuid dedup sets, subpaths
    "evalsha", "script|load",  # the fence script (redis-py loads it on NOSCRIPT)
)  # fmt: skip
"""The commands the Redis adapter sends for a session, and all a sandbox's user may run."""

_SANDBOX_ID = re.compile(r"[a-z0-9-]{1,40}")
_INSTALLATION = re.compile(r"[a-z0-9-]{1,63}")
_CREDENTIAL_OPTIONS = frozenset({
    "user", "username", "password", "passfile",
    "sslcert", "sslkey", "sslpassword", "ssl_certfile", "ssl_keyfile", "ssl_password",
})  # fmt: skip
"""URL query options that carry the admin's identity or secrets: never copied into a sandbox's URL."""


class StoreAccessError(RuntimeError):
    """The store refused or failed an admin operation (the message is free of the admin's secrets)."""


class UnknownSandbox(StoreAccessError, LookupError):
    """:meth:`SandboxStoreAccess.grant` for a sandbox that has no user (never created, or deleted)."""


class SandboxStoreAccess(Protocol):
    """The gateway's side of per-sandbox store credentials (see the module docstring).

    Every method is the admin's: the gateway calls them with the admin URL, the
    sandbox only ever sees the URL :meth:`create` returns.
    """

    async def prepare(self) -> None:
        """Admin-side set-up, idempotent; once at gateway start, before any other call.

        Postgres: the adapter's tables, the grants table, the group role, the
        privileges and the policies; then a check that a sandbox's role could not
        create objects. Redis: checks that the server has ACL selectors.
        """
        ...

    async def create(self, sandbox_id: str) -> str:
        """Make the sandbox's user with a fresh random password and no session granted;
        return the URL the sandbox connects with (the admin URL's scheme, host, port,
        database and options, with this user and password). Again for the same id:
        a new password, no grants, and the connections made with the old one cut."""
        ...

    async def grant(self, sandbox_id: str, session_ids: Collection[str]) -> None:
        """From now on the sandbox's user may use exactly these stored sessions (SDK
        session ids, canonical UUID strings), replacing earlier grants; open
        connections see the change at once. :class:`UnknownSandbox` without a user."""
        ...

    async def delete(self, sandbox_id: str) -> None:
        """Remove the sandbox's user and cut its open connections; idempotent."""
        ...

    async def sandboxes(self) -> list[str]:
        """Ids of this installation's sandboxes that have a user now (to remove orphans)."""
        ...

    async def aclose(self) -> None:
        """Release the admin connections."""
        ...


def open_sandbox_access(admin_url: str, installation: str) -> SandboxStoreAccess:
    """The :class:`SandboxStoreAccess` for ``admin_url``'s engine (no connection made yet).

    ``installation`` keeps the users of gateways sharing one store apart.
    """
    _check_installation(installation)
    scheme = urlsplit(admin_url).scheme.lower()
    if scheme in ("redis", "rediss"):
        return RedisSandboxAccess(admin_url, installation)
    if scheme in ("postgresql", "postgres"):
        return PostgresSandboxAccess(admin_url, installation)
    # Only the scheme is echoed: the URL carries the admin's password.
    raise ValueError(f"unsupported session store URL scheme {scheme!r}; accepted: postgres://, postgresql://, "
                     "redis://, rediss://")


def sandbox_user(installation: str, sandbox_id: str) -> str:
    """The store user name of one sandbox of one installation."""
    _check_installation(installation)
    _check_sandbox_id(sandbox_id)
    return _user_prefix(installation) + sandbox_id


def _user_prefix(installation: str) -> str:
    return f"{USER_PREFIX}{hashlib.sha256(installation.encode()).hexdigest()[:10]}_"


def _check_installation(installation: str) -> None:
    if not isinstance(installation, str) or not _INSTALLATION.fullmatch(installation):
        raise ValueError(f"installation must match {_INSTALLATION.pattern}, got {installation!r}")


def _check_sandbox_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not _SANDBOX_ID.fullmatch(sandbox_id):
        raise ValueError(f"sandbox id must match {_SANDBOX_ID.pattern}, got {sandbox_id!r}")


def _check_sessions(session_ids: Collection[str]) -> list[str]:
    """Canonical UUID strings only: they are the SDK's session ids, and a Redis key pattern
    built from anything else could hold glob characters."""
    if isinstance(session_ids, str):
        raise ValueError("session_ids must be a collection of session ids, not one string")
    checked: set[str] = set()
    for sid in session_ids:
        try:
            canonical = isinstance(sid, str) and str(uuid.UUID(sid)) == sid
        except ValueError:
            canonical = False
        if not canonical:
            raise ValueError(f"a session id must be a lowercase canonical UUID, got {sid!r}")
        checked.add(sid)
    return sorted(checked)


def _sandbox_url(admin_url: str, user: str, password: str) -> str:
    """The admin URL with ``user:password`` in place of the admin's, and without any option
    that carries the admin's identity, password or client certificate."""
    parts = urlsplit(admin_url)
    hostport = parts.netloc.rpartition("@")[2]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in _CREDENTIAL_OPTIONS]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"
    # %20, not +, for a space: libpq decodes only %-escapes in a URI.
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, quote_via=quote), parts.fragment))


class _Scrubber:
    """Takes the admin URL and its secrets out of any text meant for an exception message."""

    def __init__(self, admin_url: str) -> None:
        parts = urlsplit(admin_url)
        secrets_ = {admin_url}
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            secrets_.add(userinfo.partition(":")[2])
        secrets_ |= {v for k, v in parse_qsl(parts.query, keep_blank_values=True)
                     if k.lower() in _CREDENTIAL_OPTIONS and k.lower() not in ("user", "username")}
        secrets_ |= {unquote(s) for s in secrets_} | {quote(unquote(s), safe="") for s in secrets_}
        self._secrets = sorted((s for s in secrets_ if s), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Unreachable(Exception):
    """Internal: the admin connection could not be made (becomes StoreUnavailable)."""


def _ours(scrub: _Scrubber, action: str, exc: Exception, *, refused: tuple[type[Exception], ...] = (),
          unavailable: tuple[type[Exception], ...] = ()) -> Exception:
    """A driver error as the exception we raise instead, its message scrubbed."""
    if isinstance(exc, ValueError):  # the driver's (ours are raised before any call): e.g. a malformed URL
        return ValueError(scrub(f"{action}: {exc}"))
    if isinstance(exc, refused):
        return StoreAccessError(scrub(f"{action}: the store refused the admin credential: {exc}"))
    if isinstance(exc, (_Unreachable, *unavailable)):
        return StoreUnavailable(scrub(f"{action}: the session store is unreachable: {exc}"))
    return StoreAccessError(scrub(f"{action} failed: {type(exc).__name__}: {exc}"))


async def _guarded(scrub: _Scrubber, action: str, call: Awaitable[T], *, refused: tuple[type[Exception], ...] = (),
                   unavailable: tuple[type[Exception], ...] = ()) -> T:
    """Await ``call``; a driver error comes out as :func:`_ours`, raised *after* the handler, so
    the driver's exception (whose text or arguments might hold what was scrubbed) is neither
    its cause nor its context."""
    try:
        return await call
    except (StoreAccessError, StoreUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - any driver error; re-raised below, scrubbed
        error = _ours(scrub, action, exc, refused=refused, unavailable=unavailable)
    raise error


def _user(prefix: str, sandbox_id: str) -> str:
    """``prefix`` (an installation's, see :func:`sandbox_user`) plus a checked sandbox id."""
    _check_sandbox_id(sandbox_id)
    return prefix + sandbox_id


# -- Redis -------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisSandboxAccess:
    """Per-sandbox ACL users on Redis 7 (see the module docstring).

    ``prefix`` and ``project_key`` must be the adapter's (its defaults, what the
    server uses).
    """

    def __init__(self, admin_url: str, installation: str, *, prefix: str = "agent:",
                 project_key: str = PROJECT_KEY) -> None:
        _check_installation(installation)
        self._url = admin_url
        self._scrub = _Scrubber(admin_url)
        self._user_prefix = _user_prefix(installation)
        error: Exception | None = None
        try:
            self._client = redis.Redis.from_url(
                admin_url, decode_responses=True, socket_connect_timeout=5,
                # One re-dial: enough for a pooled connection left dead by a Redis restart.
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
            )
            self._db = int(self._client.connection_pool.connection_kwargs.get("db") or 0)
        except Exception as exc:  # noqa: BLE001 - re-raised below (outside the handler), scrubbed
            error = _ours(self._scrub, "opening the Redis store", exc)
        if error is not None:
            raise error
        project = f"{prefix}{quote(project_key, safe='/')}"
        self._session_pattern: str = _glob_escape(project) + ":{}:*"
        self._index: str = f"{project}:sessions"
        self._commands: tuple[str, ...] | None = None
        self._aclfile: bool | None = None

    def _guard(self, action: str, call: Awaitable[T]) -> Awaitable[T]:
        # AuthenticationError is a ConnectionError to redis-py, but not an outage: it is checked first.
        return _guarded(self._scrub, action, call, refused=(AuthenticationError,),
                        unavailable=(RedisConnectionError, RedisTimeoutError))

    async def prepare(self) -> None:
        """Check the server has ACL selectors (Redis 7) and warn if the default user is open."""
        await self._guard("preparing per-sandbox Redis users", self._server())
        default = cast("dict[str, Any] | None", await self._guard(
            "preparing per-sandbox Redis users", self._command("ACL", "GETUSER", "default")))
        if default is not None:
            flags = set(default.get("flags") or [])
            if {"on", "nopass"} <= flags:
                log.warning("the Redis session store's default user needs no password: any sandbox can connect "
                            "as it and read every session, whatever its own user is allowed")

    async def create(self, sandbox_id: str) -> str:
        """``ACL SETUSER <user> reset on #<sha256>`` with the commands and no key; cut old connections."""
        user = _user(self._user_prefix, sandbox_id)
        password = secrets.token_urlsafe(32)
        digest = hashlib.sha256(password.encode()).hexdigest()
        await self._guard(f"creating the store user of sandbox {sandbox_id}", self._create(user, digest))
        return _sandbox_url(self._url, user, password)

    async def _create(self, user: str, digest: str) -> None:
        rules = await self._rules([])
        await self._command("ACL", "SETUSER", user, "reset", "on", f"#{digest}", *rules)
        await self._command("CLIENT", "KILL", "USER", user)  # after a reset: the old password's
        await self._save()

    async def grant(self, sandbox_id: str, session_ids: Collection[str]) -> None:
        """Replace the user's key patterns with the granted sessions' (one ``ACL SETUSER``)."""
        user = _user(self._user_prefix, sandbox_id)
        sessions = _check_sessions(session_ids)
        await self._guard(f"granting sessions to sandbox {sandbox_id}", self._grant(sandbox_id, user, sessions))

    async def _grant(self, sandbox_id: str, user: str, sessions: list[str]) -> None:
        # SETUSER would create a missing user (disabled): refuse instead.
        if await self._command("ACL", "GETUSER", user) is None:
            raise UnknownSandbox(f"sandbox {sandbox_id} has no store user")
        await self._command("ACL", "SETUSER", user, *await self._rules(sessions))
        await self._save()

    async def delete(self, sandbox_id: str) -> None:
        """``ACL DELUSER``: Redis closes the user's connections itself."""
        user = _user(self._user_prefix, sandbox_id)
        if await self._guard(f"deleting the store user of sandbox {sandbox_id}", self._command("ACL", "DELUSER", user)):
            await self._guard(f"deleting the store user of sandbox {sandbox_id}", self._save())

    async def sandboxes(self) -> list[str]:
        users = cast("list[str]", await self._guard("listing the sandboxes' store users", self._command("ACL", "USERS")))
        n = len(self._user_prefix)
        return sorted(u[n:] for u in users if u.startswith(self._user_prefix) and _SANDBOX_ID.fullmatch(u[n:]))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _command(self, *args: str) -> Any:
        return await self._client.execute_command(*args)  # type: ignore[no-untyped-call]  # redis-py leaves it so

    # -- helpers ----------------------------------------------------------

    async def _rules(self, sessions: list[str]) -> list[str]:
        """The whole permission set of a user granted ``sessions`` (everything reset first)."""
        commands = await self._server()
        rules = ["resetkeys", "resetchannels", "clearselectors", "-@all", *(f"+{c}" for c in commands)]
        rules += [f"~{self._session_pattern.format(sid)}" for sid in sessions]
        if sessions:
            rules.append(f"(%W~{_glob_escape(self._index)} +sadd)")
        return rules

    async def _server(self) -> tuple[str, ...]:
        """What the server needs of us, asked once: its version and whether it has an aclfile."""
        if self._commands is None:
            info = await self._client.info("server")
            version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
            if version < (7, 0):
                raise StoreAccessError(f"per-sandbox store users need Redis 7.0 or newer (ACL selectors), "
                                       f"the server is {info.get('redis_version')}")
            config = cast("dict[str, str]", await self._client.config_get("aclfile"))
            self._aclfile = bool(config.get("aclfile"))
            extra = (("client|setinfo",) if version >= (7, 2) else ()) + (("select",) if self._db else ())
            self._commands = REDIS_COMMANDS + extra
        return self._commands

    async def _save(self) -> None:
        """Persist the ACL when the server has a file for it (otherwise a restart forgets the users)."""
        if self._aclfile:
            await self._command("ACL", "SAVE")


# -- PostgreSQL ----------------------------------------------------------------

_POLICY = "agent_sandbox_sessions"

# What the group role of the sandboxes may do, per table suffix: (privilege, columns or None).
_PRIVILEGES: dict[str, tuple[tuple[str, tuple[str, ...] | None], ...]] = {
    "": (("SELECT", None), ("INSERT", None), ("DELETE", None)),
    "_transcripts": (("SELECT", None), ("INSERT", None), ("DELETE", None), ("UPDATE", ("mtime", "summary"))),
    "_epochs": (("SELECT", None), ("INSERT", None), ("DELETE", None), ("UPDATE", ("epoch", "mtime"))),
    "_grants": (("SELECT", None),),
}
# ... and must not, whoever granted it (TRUNCATE bypasses RLS, TRIGGER runs code as the writer).
_FORBIDDEN: dict[str, tuple[str, ...]] = {
    "": ("UPDATE", "TRUNCATE", "REFERENCES", "TRIGGER"),
    "_transcripts": ("TRUNCATE", "REFERENCES", "TRIGGER"),
    "_epochs": ("TRUNCATE", "REFERENCES", "TRIGGER"),
    "_grants": ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"),
}
_KEY_COLUMNS = {"_transcripts": ("project_key", "session_id", "subpath"), "_epochs": ("project_key", "session_id")}

_GRANTS_TABLE = """
CREATE TABLE IF NOT EXISTS {grants} (
    role        text PRIMARY KEY,
    project_key text NOT NULL,
    session_ids text[] NOT NULL DEFAULT '{{}}'
)
"""
_SESSION_POLICY = (
    "CREATE POLICY {policy} ON {table} USING ("
    "NOT starts_with(current_user::text, {prefix}) OR EXISTS (SELECT 1 FROM {grants} g "
    "WHERE g.role = current_user::text AND g.project_key = {table}.project_key "
    "AND {table}.session_id = ANY (g.session_ids)))"
)
_GRANTS_POLICY = (
    "CREATE POLICY {policy} ON {grants} USING ("
    "NOT starts_with(current_user::text, {prefix}) OR role = current_user::text)"
)


class PostgresSandboxAccess:
    """Per-sandbox login roles and row-level security on PostgreSQL (see the module docstring).

    ``table`` and ``project_key`` must be the adapter's (its defaults, what the server
    uses). Each call opens its own short connection: these calls come once or twice per
    sandbox, and a connection held open is one a sandbox could not have.
    """

    def __init__(self, admin_url: str, installation: str, *, table: str = "agent_session_entries",
                 project_key: str = PROJECT_KEY) -> None:
        _check_installation(installation)
        try:
            import psycopg  # noqa: F401 - fail here, not at the first call

            from .postgres_store import _IDENTIFIER
        except ModuleNotFoundError as exc:
            raise MissingStoreDriver(
                f"per-sandbox PostgreSQL roles need the PostgreSQL driver ({exc.name} is not installed): "
                'pip install "research-agent-hosting[stores]"'
            ) from None
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(f"table must match {_IDENTIFIER.pattern}, got {table!r}")
        self._url = admin_url
        self._scrub = _Scrubber(admin_url)
        self._table = table
        self._project_key = project_key
        self._user_prefix = _user_prefix(installation)
        self._group = self._user_prefix[:-1]  # agent_sbx_<hash>: no sandbox id, never listed as one

    def _name(self, suffix: str) -> str:
        return f"{self._table}{suffix}"

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """One admin connection; a failure to make it is :class:`_Unreachable`."""
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise _Unreachable(str(exc)) from None
        async with conn:
            yield conn

    def _guard(self, action: str, call: Awaitable[T]) -> Awaitable[T]:
        return _guarded(self._scrub, action, call)

    # -- protocol ---------------------------------------------------------

    async def prepare(self) -> None:
        """Tables, grants table, group role, privileges and policies (only what is missing,
        so a restart takes no table locks), then check that a sandbox could not create
        objects the admin's queries might resolve to."""
        await self._guard("preparing per-sandbox Postgres roles", self._prepare())

    async def _prepare(self) -> None:
        from .postgres_store import PostgresSessionStore

        async with self._connection() as conn:
            await self._check_admin(conn)
            store = PostgresSessionStore(self._url, table=self._table, max_connections=1)
            try:
                await store.open()  # the adapter's own tables, as it makes them
            finally:
                await store.aclose()
            if not await self._set_up(conn):
                async with conn.transaction():
                    # Only on a first start (or an upgrade): no sandbox can hold this lock yet.
                    await conn.execute("SET LOCAL lock_timeout = '10s'")
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self._table}/access",))
                    await self._set_up_now(conn)
            await self._check_isolation(conn)

    async def create(self, sandbox_id: str) -> str:
        """``CREATE ROLE`` (or, again, ``ALTER ROLE``) with a new password, in the group, with an
        empty grants row; then the role's old connections terminated."""
        role = _user(self._user_prefix, sandbox_id)
        password = secrets.token_urlsafe(32)
        await self._guard(f"creating the store role of sandbox {sandbox_id}", self._create(role, password))
        return _sandbox_url(self._url, role, password)

    async def _create(self, role: str, password: str) -> None:
        from psycopg import errors, sql

        async with self._connection() as conn:
            row = await (await conn.execute("SHOW password_encryption")).fetchone()
            algorithm = str(row[0]) if row else "scram-sha-256"
            # The server gets the verifier, never the password (statement logs keep statements).
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), algorithm.encode())
            # Superuser, replication and BYPASSRLS only a superuser can give (or even name in an ALTER).
            attributes = sql.SQL(
                "LOGIN NOCREATEDB NOCREATEROLE INHERIT CONNECTION LIMIT {limit} PASSWORD {verifier}"
            ).format(limit=sql.Literal(CONNECTION_LIMIT), verifier=sql.Literal(verifier.decode()))
            try:
                await self._make_role(conn, role, attributes)
            except (errors.DuplicateObject, errors.UniqueViolation):
                await self._make_role(conn, role, attributes)  # made concurrently: now it exists
            await self._terminate(conn, role)

    async def grant(self, sandbox_id: str, session_ids: Collection[str]) -> None:
        """Replace the role's grants row (one upsert, so concurrent grants cannot merge)."""
        role = _user(self._user_prefix, sandbox_id)
        sessions = _check_sessions(session_ids)
        await self._guard(f"granting sessions to sandbox {sandbox_id}", self._grant(sandbox_id, role, sessions))

    async def _grant(self, sandbox_id: str, role: str, sessions: list[str]) -> None:
        from psycopg import sql

        async with self._connection() as conn, conn.transaction():
            if not await self._role_exists(conn, role):
                raise UnknownSandbox(f"sandbox {sandbox_id} has no store role")
            await conn.execute(
                sql.SQL("INSERT INTO {g} (role, project_key, session_ids) VALUES (%s, %s, %s) "
                        "ON CONFLICT (role) DO UPDATE SET project_key = EXCLUDED.project_key, "
                        "session_ids = EXCLUDED.session_ids").format(g=sql.Identifier(self._name("_grants"))),
                (role, self._project_key, sessions),
            )

    async def delete(self, sandbox_id: str) -> None:
        """Disable the role (no login, no password, out of the group, no grants), terminate its
        backends, then ``DROP OWNED`` and ``DROP ROLE``. Should the drop fail (objects it made
        in another database), the role is inert already and the error says what is left."""
        role = _user(self._user_prefix, sandbox_id)
        await self._guard(f"deleting the store role of sandbox {sandbox_id}", self._delete(role))

    async def _delete(self, role: str) -> None:
        from psycopg import sql

        ident = sql.Identifier(role)
        async with self._connection() as conn:
            async with conn.transaction():
                await conn.execute(sql.SQL("DELETE FROM {g} WHERE role = %s").format(
                    g=sql.Identifier(self._name("_grants"))), (role,))
                if not await self._role_exists(conn, role):
                    return
                await conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(ident))
                await conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(self._group), ident))
            await self._terminate(conn, role)
            async with conn.transaction():
                await conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                await conn.execute(sql.SQL("DROP ROLE {}").format(ident))

    async def sandboxes(self) -> list[str]:
        roles = await self._guard("listing the sandboxes' store roles", self._roles())
        n = len(self._user_prefix)
        return sorted(r[n:] for r in roles if _SANDBOX_ID.fullmatch(r[n:]))

    async def _roles(self) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute("SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, %s)",
                                     (self._user_prefix,))
            return [str(name) for (name,) in await cur.fetchall()]

    async def aclose(self) -> None:
        """Nothing to release: every call closes its own connection."""

    # -- helpers ----------------------------------------------------------

    async def _role_exists(self, conn: AsyncConnection[Any], role: str) -> bool:
        cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        return await cur.fetchone() is not None

    async def _make_role(self, conn: AsyncConnection[Any], role: str, attributes: Composable) -> None:
        """One transaction: the role with ``attributes``, in the group, the admin a member of it
        (which lets a non-superuser admin terminate its backends and drop what it owns), and
        an empty grants row."""
        from psycopg import sql

        ident = sql.Identifier(role)
        async with conn.transaction():
            if await self._role_exists(conn, role):
                await conn.execute(sql.SQL("ALTER ROLE {} {}").format(ident, attributes))
            else:
                await conn.execute(sql.SQL("CREATE ROLE {} NOSUPERUSER NOREPLICATION NOBYPASSRLS {}").format(
                    ident, attributes))
                await conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(ident))
            await conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(self._group), ident))
            await conn.execute(
                sql.SQL("INSERT INTO {g} (role, project_key, session_ids) VALUES (%s, %s, '{{}}') "
                        "ON CONFLICT (role) DO UPDATE SET project_key = EXCLUDED.project_key, session_ids = '{{}}'"
                        ).format(g=sql.Identifier(self._name("_grants"))),
                (role, self._project_key),
            )

    async def _terminate(self, conn: AsyncConnection[Any], role: str) -> None:
        """End every backend of ``role`` and wait for them to be gone."""
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE NOT pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE usename = %s AND pid <> pg_backend_pid()", (role,))
        row = await cur.fetchone()
        if row and row[0]:
            raise StoreAccessError(f"could not terminate {row[0]} connection(s) of store role {role}")

    async def _check_admin(self, conn: AsyncConnection[Any]) -> None:
        cur = await conn.execute("SELECT current_user::text, rolsuper OR rolcreaterole FROM pg_roles "
                                 "WHERE rolname = current_user")
        row = await cur.fetchone()
        if row is None or not row[1]:
            raise StoreAccessError("the session store's admin role needs CREATEROLE to make per-sandbox roles")
        if str(row[0]).startswith(USER_PREFIX):
            raise StoreAccessError(f"the admin role's name must not start with {USER_PREFIX!r}")

    async def _set_up(self, conn: AsyncConnection[Any]) -> bool:
        """Whether the grants table, the group, its privileges, RLS and the policies are all there."""
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL AND EXISTS "
                                 "(SELECT 1 FROM pg_roles WHERE rolname = %s)", (self._name("_grants"), self._group))
        row = await cur.fetchone()
        if not (row and row[0]):
            return False
        checks: list[str] = []
        params: list[Any] = []
        for suffix, privileges in _PRIVILEGES.items():
            checks += ["(SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass(%s))",
                       "EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = to_regclass(%s) AND polname = %s)"]
            params += [self._name(suffix), self._name(suffix), _POLICY]
            for privilege, columns in privileges:
                if columns is None:
                    checks.append("has_table_privilege(%s, %s, %s)")
                    params += [self._group, self._name(suffix), privilege]
                for column in columns or ():
                    checks.append("has_column_privilege(%s, %s, %s, %s)")
                    params += [self._group, self._name(suffix), column, privilege]
        cur = await conn.execute("SELECT " + " AND ".join(checks), params)
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _set_up_now(self, conn: AsyncConnection[Any]) -> None:
        """In the caller's transaction: everything :meth:`_set_up` checks, what is missing of it."""
        from psycopg import sql

        grants = sql.Identifier(self._name("_grants"))
        group = sql.Identifier(self._group)
        await conn.execute(sql.SQL(_GRANTS_TABLE).format(grants=grants))
        if not await self._role_exists(conn, self._group):
            await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(group))
        cur = await conn.execute(
            "SELECT n.nspname::text, has_schema_privilege(%s, n.oid, 'USAGE') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)", (self._group, self._table))
        row = await cur.fetchone()
        if row is not None and not row[1]:
            await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(row[0]), group))
        for suffix, privileges in _PRIVILEGES.items():
            table = sql.Identifier(self._name(suffix))
            for privilege, columns in privileges:
                cols = sql.SQL("") if columns is None else sql.SQL(" ({})").format(
                    sql.SQL(", ").join(map(sql.Identifier, columns)))
                await conn.execute(sql.SQL("GRANT {}{} ON {} TO {}").format(sql.SQL(privilege), cols, table, group))
            cur = await conn.execute(
                "SELECT relrowsecurity, EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = c.oid AND polname = %s) "
                "FROM pg_class c WHERE c.oid = to_regclass(%s)", (_POLICY, self._name(suffix)))
            row = await cur.fetchone()
            if row is None or not row[0]:
                await conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(table))
            if row is None or not row[1]:
                template = _GRANTS_POLICY if suffix == "_grants" else _SESSION_POLICY
                await conn.execute(sql.SQL(template).format(
                    policy=sql.Identifier(_POLICY), table=table, grants=grants, prefix=sql.Literal(USER_PREFIX)))

    async def _check_isolation(self, conn: AsyncConnection[Any]) -> None:
        """Refuse to go on when a sandbox's role could create objects (a table, function or
        operator in a schema on the admin's search path is code the admin would run; a schema
        named like the admin would come first on its path) or holds a privilege that gets
        round RLS. Rights given to PUBLIC count: the group has them too."""
        cur = await conn.execute(
            "SELECT n FROM unnest(current_schemas(false)) AS n WHERE has_schema_privilege(%s, n, 'CREATE') "
            "UNION ALL SELECT 'database ' || current_database() "
            "WHERE has_database_privilege(%s, current_database(), 'CREATE')",
            (self._group, self._group))
        creatable = [str(n) for (n,) in await cur.fetchall()]
        if creatable:
            raise StoreAccessError(
                f"sandboxes' store roles could create objects in {', '.join(creatable)} (granted to PUBLIC?): "
                "revoke that CREATE from PUBLIC (PostgreSQL 15's default) before handing out per-sandbox roles")
        checks: list[str] = []
        params: list[Any] = []
        for suffix, privileges in _FORBIDDEN.items():
            for privilege in privileges:
                checks.append("has_table_privilege(%s, %s, %s)")
                params += [self._group, self._name(suffix), privilege]
            for column in _KEY_COLUMNS.get(suffix, ()):
                checks.append("has_column_privilege(%s, %s, %s, 'UPDATE')")
                params += [self._group, self._name(suffix), column]
        cur = await conn.execute("SELECT " + " OR ".join(checks), params)
        row = await cur.fetchone()
        if row and row[0]:
            raise StoreAccessError(
                f"sandboxes' store roles hold more than the adapter needs on the {self._table} tables (TRUNCATE, "
                "TRIGGER, REFERENCES, UPDATE of key columns or writes to the grants; granted to PUBLIC?): revoke it")
