"""Transport security: CurveZMQ encryption, an allow-list of worker keys, and key-bound worker identities.

Set-up (the ``keys`` CLI does the first two steps)::

    dist-llm-train keys generate keys/ --name controller       # on the controller's machine
    dist-llm-train keys generate keys/ --name worker-0         # on each worker's machine
    mkdir -p allow/ && cp keys/worker-0.key allow/             # PUBLIC .key files only, never .key_secret

The controller runs :class:`CurveServer` (its keypair + a ZAP authenticator reading ``allow/``); a worker
runs :class:`CurveClient` (its keypair + the controller's public ``controller.key``). A worker whose public
key is not in ``allow/`` fails the handshake: its messages never reach the controller's socket. Call
:meth:`CurveServer.reload` after adding or removing keys.

Identity binding: with Curve, libzmq stamps every received message with the ZAP ``User-Id`` property,
which pyzmq's authenticator sets to the z85 public key the peer proved it holds. The controller derives the
worker id from that key (:func:`worker_id_from_key`) and ignores any id or name a message claims, so no
worker can heartbeat, push or complete a lease as another. Plaintext (``insecure=True``) has no such
binding: the worker id is the ROUTER routing id, which any peer can choose.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.runtime.protocol import ProtocolError

__all__ = [
    "CurveClient",
    "CurveServer",
    "KeyPair",
    "generate_keys",
    "load_keypair",
    "load_public_key",
    "peer_identity",
    "random_routing_id",
    "worker_id_from_key",
]

_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


@dataclass(frozen=True)
class KeyPair:
    """A Curve25519 keypair as z85 text (40 ASCII bytes each). ``secret`` is ``None`` for a public key only."""

    public: bytes
    secret: bytes | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"KeyPair(public={self.public.decode()!r}, secret={'<set>' if self.secret else None})"

    @property
    def worker_id(self) -> str:
        """The worker id the controller derives from this key."""
        return worker_id_from_key(self.public)


# ---------------------------------------------------------------------- key files
def generate_keys(
    directory: str | os.PathLike[str], name: str, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write a new keypair ``DIR/NAME.key`` (public, mode 0644) and ``DIR/NAME.key_secret`` (mode 0600).

    ``directory`` is created with mode 0700 when missing (an existing one keeps its mode). The files are
    written by ``zmq.auth.create_certificates`` into a private temporary directory and moved into place, so
    the secret is never readable by others, not even for a moment. Existing files are refused unless
    ``overwrite``. Returns ``(public_path, secret_path)``.
    """
    if not isinstance(name, str) or not _KEY_NAME.match(name):
        raise ConfigError(
            f"key name {name!r} must be 1-64 letters, digits, '_', '.', '-' starting with a letter or digit "
            "(e.g. controller or worker-3)"
        )
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"key directory {str(target)!r} exists and is not a directory: choose another path")
    public_path, secret_path = target / f"{name}{PUBLIC_SUFFIX}", target / f"{name}{SECRET_SUFFIX}"
    if not overwrite and (public_path.exists() or secret_path.exists()):
        raise ConfigError(
            f"keys {name!r} already exist in {str(target)!r}: choose another --name, or overwrite them "
            "(--force) and copy the new public key to every allow-list"
        )
    try:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".keygen-", dir=target))  # mkdtemp creates it 0700
    except OSError as exc:
        raise ConfigError(
            f"cannot write keys to {str(target)!r} ({exc.strerror}): choose a writable directory"
        ) from None
    try:
        pub_tmp, sec_tmp = (Path(p) for p in zmq.auth.create_certificates(staging, name))
        os.chmod(sec_tmp, 0o600)
        os.chmod(pub_tmp, 0o644)
        os.replace(sec_tmp, secret_path)
        os.replace(pub_tmp, public_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return public_path, secret_path


def _read_certificate(path: Path) -> tuple[bytes | None, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"key file {str(path)!r} not found: create it with `dist-llm-train keys generate`")
    try:
        return zmq.auth.load_certificate(path)
    except Exception as exc:  # pyzmq raises ValueError/OSError/UnicodeDecodeError on bad files
        raise ConfigError(f"key file {str(path)!r} is not a CurveZMQ certificate ({exc})") from None


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key in a ``.key`` (or ``.key_secret``) file, e.g. the controller's for a worker."""
    public, _ = _read_certificate(Path(path))
    return _check_key(public, f"public key in {str(path)!r}")


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """Load a full keypair from ``NAME.key_secret`` (given ``NAME.key`` or ``NAME``, the secret file beside it).

    Refuses a secret file readable by group or others (fix: ``chmod 600 FILE``) and a file whose public
    key does not belong to its secret key (a corrupted or tampered file).
    """
    given = Path(path)
    if given.suffix == PUBLIC_SUFFIX:
        secret_path = given.with_suffix(SECRET_SUFFIX)
    elif given.suffix == SECRET_SUFFIX:
        secret_path = given
    else:
        secret_path = given.with_name(given.name + SECRET_SUFFIX)
    public, secret = _read_certificate(secret_path)
    if secret is None:
        raise ConfigError(f"{str(secret_path)!r} holds no secret key: pass the NAME.key_secret file")
    if os.name == "posix" and secret_path.stat().st_mode & 0o077:
        raise ConfigError(
            f"secret key {str(secret_path)!r} is readable by other users: run `chmod 600 {secret_path}`"
        )
    public = _check_key(public, f"public key in {str(secret_path)!r}")
    secret = _check_key(secret, f"secret key in {str(secret_path)!r}")
    if zmq.curve_public(secret) != public:
        raise ConfigError(
            f"{str(secret_path)!r}: the public key does not belong to the secret key; regenerate the keys"
        )
    return KeyPair(public=public, secret=secret)


def _check_key(key: bytes | str | None, what: str) -> bytes:
    raw = key.encode("ascii", "replace") if isinstance(key, str) else key
    if raw is None or len(raw) != 40:
        raise ConfigError(f"{what} must be 40 z85 characters, got {len(raw) if raw else 0}")
    try:
        z85.decode(raw)
    except Exception:
        raise ConfigError(f"{what} is not valid z85 text") from None
    return raw


# ---------------------------------------------------------------------- identities
def worker_id_from_key(public_key: bytes | str) -> str:
    """The worker id bound to a z85 public key: ``"w-"`` + the first 128 bits of its SHA-256, in hex.

    Stable across restarts and reconnects, safe in file names and metric labels, and forging a key with
    the same id needs a 2^128 search.
    """
    key = public_key.encode("ascii") if isinstance(public_key, str) else bytes(public_key)
    return "w-" + hashlib.sha256(key).hexdigest()[:32]


def random_routing_id() -> bytes:
    """A fresh unguessable routing id for a DEALER (16 bytes, never starting with 0, which ZeroMQ reserves).

    Keep one per worker process: with ROUTER_HANDOVER a reconnect under the same routing id replaces the
    stale connection, and since others cannot guess it, nobody else can take the connection over.
    """
    return b"r" + secrets.token_bytes(15)


def peer_identity(routing_id: bytes, user_id: str | None, *, secure: bool) -> str:
    """The worker id of a received message: from the authenticated key when ``secure``, else the routing id.

    ``user_id``: the message's ZAP ``User-Id`` property (the peer's z85 public key). A secure socket that
    delivers a message without one has no authenticator running; that is refused with a
    :class:`ProtocolError` (code ``identity``) rather than trusted.
    """
    if secure:
        if not user_id or len(user_id) != 40:
            raise ProtocolError(
                "identity", "message carries no authenticated key (is the ZAP authenticator running?)"
            )
        return worker_id_from_key(user_id)
    if routing_id and routing_id[0] != 0 and len(routing_id) <= 64:
        try:
            text = routing_id.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if text.isprintable() and text and not text.startswith("0x"):
            return text
    return "0x" + routing_id.hex()


# ---------------------------------------------------------------------- sockets
class CurveServer:
    """The controller's side of CurveZMQ: its keypair and a ZAP authenticator admitting the allow-list.

    ``context``: the ZeroMQ context of the controller's sockets (ZAP is per context). ``keypair``: the
    controller's keys (:func:`load_keypair`). ``allow_list``: a directory of workers' public ``.key`` files;
    a missing or empty one is refused (it would admit nobody). Use as a context manager, or call
    :meth:`start` / :meth:`stop`; :meth:`apply` a started server to the ROUTER socket before it binds.

    Symptom: a worker connects but nothing arrives → its public key is not in ``allow_list`` (or
    :meth:`reload` was not called after copying it there), or it uses another controller public key.
    """

    def __init__(self, context: zmq.Context, keypair: KeyPair, allow_list: str | os.PathLike[str]) -> None:
        if keypair.secret is None:
            raise ConfigError(
                "the controller needs its secret key: load it with load_keypair(NAME.key_secret)"
            )
        self.context = context
        self.keypair = keypair
        self.allow_list = Path(allow_list)
        self._auth: ThreadAuthenticator | None = None
        self._allowed: frozenset[bytes] = frozenset()

    def _read_allow_list(self) -> frozenset[bytes]:
        if not self.allow_list.is_dir():
            raise ConfigError(
                f"allow-list directory {str(self.allow_list)!r} not found: create it and copy the workers' "
                "public .key files into it"
            )
        try:
            keys = frozenset(zmq.auth.load_certificates(self.allow_list))
        except Exception as exc:
            raise ConfigError(
                f"allow-list {str(self.allow_list)!r} holds an unreadable key file ({exc})"
            ) from None
        if not keys:
            raise ConfigError(
                f"allow-list {str(self.allow_list)!r} holds no public .key files, so no worker could connect: "
                "copy each worker's NAME.key into it"
            )
        return keys

    def start(self) -> CurveServer:
        """Start the authenticator thread and load the allow-list. Idempotent."""
        if self._auth is not None:
            return self
        keys = self._read_allow_list()
        auth = ThreadAuthenticator(self.context)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allow_list))
        self._auth, self._allowed = auth, keys
        return self

    def reload(self) -> int:
        """Re-read the allow-list directory (after adding or removing keys); returns the number of keys.
        Connections already admitted stay open."""
        if self._auth is None:
            raise PreconditionError("CurveServer.reload() needs a started server: call start() first")
        keys = self._read_allow_list()
        self._auth.configure_curve(domain="*", location=str(self.allow_list))
        self._allowed = keys
        return len(keys)

    @property
    def allowed_keys(self) -> frozenset[bytes]:
        """The z85 public keys admitted now."""
        return self._allowed

    @property
    def running(self) -> bool:
        return self._auth is not None and self._auth.is_alive()

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a Curve server with the controller's keys (before ``bind``)."""
        if not self.running:
            # Without a ZAP handler libzmq admits every client key: encryption without authentication.
            raise PreconditionError("CurveServer.apply() needs a running authenticator: call start() first")
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_server = True

    def stop(self) -> None:
        """Stop the authenticator thread (joins it). Idempotent."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> CurveServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class CurveClient:
    """A worker's side of CurveZMQ: its keypair and the controller's public key.

    ``keypair``: the worker's keys (:func:`load_keypair`); its public ``.key`` must be on the controller's
    allow-list. ``server_public_key``: the controller's z85 public key (:func:`load_public_key` of
    ``controller.key``); a wrong one makes the handshake fail silently, like a missing allow-list entry.
    """

    def __init__(self, keypair: KeyPair, server_public_key: bytes) -> None:
        if keypair.secret is None:
            raise ConfigError("a worker needs its secret key: load it with load_keypair(NAME.key_secret)")
        self.keypair = keypair
        self.server_public_key = _check_key(server_public_key, "controller public key")

    @property
    def worker_id(self) -> str:
        """The id the controller will know this worker by."""
        return self.keypair.worker_id

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a Curve client of the controller (before ``connect``)."""
        socket.curve_secretkey = self.keypair.secret
        socket.curve_publickey = self.keypair.public
        socket.curve_serverkey = self.server_public_key
