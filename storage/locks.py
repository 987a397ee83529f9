"""One exclusive lock per output (or model) dir, held for a whole run.

Two runs writing into one dir corrupt it (a manifest with another run's vocabulary, shards the
manifest does not count, interleaved checkpoints), so every job takes the dir's lock before it
reads what is there and holds it until its outputs are in place. A second run is refused with
one line naming the holder.

* Local dirs: ``<dir>/.hubflow.lock`` locked with ``fasteners.InterProcessLock`` (POSIX
  ``lockf``, Windows ``msvcrt``). fasteners is maintained, small, already installed as a
  dependency of apache-beam, and its locks belong to the process: when a run dies, even by
  SIGKILL, the OS releases its lock, so a local lock is never stale. The holder's pid, host,
  program and start time are written next to it (``.hubflow.lock.json``) for the message.
* ``gs://`` dirs: a lock object ``<dir>/.hubflow.lock`` created only if absent (a GCS
  generation precondition, atomic on the server) holding the same owner record, deleted at the
  end. A killed run leaves it behind: it is stale when its owner ran on this host and that pid
  is gone; otherwise ``--break_lock`` deletes it (say so only when that run is really dead).
* Other remote schemes have no atomic create here: the lock is best-effort (checked, then
  written) and a warning says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import json
import logging
import os
import socket
import threading
from typing import Protocol

from schemas.cli import UsageError

_LOGGER = logging.getLogger(__name__)
LOCK_FILE = ".hubflow.lock"
OWNER_FILE = ".hubflow.lock.json"

# Dirs locked by this process: POSIX record locks do not exclude a second lock taken by the
# same process, so the process keeps its own list.
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a lock."""

    prog: str
    pid: int
    host: str
    user: str
    started: str

    @classmethod
    def me(cls, prog: str) -> Owner:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid()) if hasattr(os, "getuid") else "?"
        return cls(
            prog=prog,
            pid=os.getpid(),
            host=socket.gethostname(),
            user=user,
            started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return (
            f"{self.prog} (pid {self.pid} on {self.host}, user {self.user}, since {self.started})"
        )

    def is_dead(self) -> bool:
        """True only when this owner certainly is gone: same host, no such process."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _join(directory: str, name: str) -> str:
    return (
        f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)
    )


def _ensure_local_dir(directory: str, flag: str) -> None:
    """Creates ``directory``; a path that is a file or cannot be written is a usage error."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{flag}: {directory} is a file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag}: cannot create {directory}: {e.strerror or e}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {directory} is not writable")


class DirLock:
    """Context manager: holds the exclusive lock of ``directory`` for a run of ``prog``.

    Args:
      directory: the output or model dir (local, or a ``gs://`` / other remote URL).
      prog: the program, recorded as the owner (``hubflow-preprocess`` …).
      flag: the flag that named the dir, for messages.
      break_lock: delete a remote lock left by a run that is gone (``--break_lock``).
      backend: the remote lock store (tests pass a fake); default: by the URL's scheme.

    Raises (on enter):
      UsageError: the dir is a file, cannot be created or written, or another run holds it.
    """

    def __init__(
        self,
        directory: str,
        prog: str,
        flag: str,
        break_lock: bool = False,
        backend: RemoteLockBackend | None = None,
    ):
        self._dir = directory
        self._prog = prog
        self._flag = flag
        self._break = break_lock
        self._backend = backend
        self._local = None
        self._key = directory.rstrip("/") if "://" in directory else os.path.realpath(directory)
        self._remote_token = None

    def __enter__(self) -> DirLock:
        with _HELD_LOCK:
            if self._key in _HELD:
                raise UsageError(f"{self._flag}: {self._dir} is in use by this process")
            _HELD.add(self._key)
        try:
            if "://" in self._dir:
                self._acquire_remote()
            else:
                self._acquire_local()
        except BaseException:
            with _HELD_LOCK:
                _HELD.discard(self._key)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._local is not None:
                try:
                    os.remove(_join(self._dir, OWNER_FILE))
                except OSError:
                    pass
                self._local.release()
            elif self._remote_token is not None:
                self._remote().delete(_join(self._dir, LOCK_FILE), self._remote_token)
        finally:
            with _HELD_LOCK:
                _HELD.discard(self._key)

    def _refuse(self, owner: Owner | None, hint: str) -> UsageError:
        holder = owner.describe() if owner else "another run"
        return UsageError(f"{self._flag}: {self._dir} is in use by {holder}; {hint}")

    def _acquire_local(self) -> None:
        import fasteners

        _ensure_local_dir(self._dir, self._flag)
        lock = fasteners.InterProcessLock(_join(self._dir, LOCK_FILE))
        if not lock.acquire(blocking=False):
            try:
                with open(_join(self._dir, OWNER_FILE), encoding="utf-8") as f:
                    owner = Owner.from_json(f.read())
            except OSError:
                owner = None
            raise self._refuse(owner, "wait for it to finish or use another directory")
        self._local = lock
        with open(_join(self._dir, OWNER_FILE), "w", encoding="utf-8") as f:
            f.write(Owner.me(self._prog).to_json())

    def _remote(self) -> RemoteLockBackend:
        if self._backend is None:
            self._backend = backend_for(self._dir)
        return self._backend

    def _acquire_remote(self) -> None:
        path = _join(self._dir, LOCK_FILE)
        backend = self._remote()
        me = Owner.me(self._prog)
        token = backend.create(path, me.to_json())
        if token is None:
            text, old_token = backend.read(path)
            owner = Owner.from_json(text) if text is not None else None
            stale = owner is not None and owner.is_dead()
            if not (stale or self._break):
                raise self._refuse(
                    owner,
                    "wait for it to finish, or if that run is dead pass --break_lock",
                )
            _LOGGER.warning(
                "%s: breaking the lock of %s (%s)",
                self._dir,
                owner.describe() if owner else "an unknown run",
                "its process is gone" if stale else "--break_lock",
            )
            if old_token is not None:
                backend.delete(path, old_token)
            token = backend.create(path, me.to_json())
            if token is None:
                raise self._refuse(None, "another run took it just now")
        self._remote_token = token


class RemoteLockBackend(Protocol):
    """An object store that can create an object only if it does not exist."""

    def create(self, path: str, text: str):
        """Creates ``path`` holding ``text`` if absent; a token for :meth:`delete`, or None."""

    def read(self, path: str) -> tuple[str | None, object]:
        """``(text, token)`` of ``path``, or ``(None, None)`` when it is gone."""

    def delete(self, path: str, token) -> None:
        """Deletes ``path`` if it is still the object ``token`` names."""


class GcsLockBackend:
    """Lock objects on GCS: create with ``if_generation_match=0``, delete by generation."""

    def __init__(self, client=None):
        self._client = client

    def _blob(self, path: str):
        from google.cloud import storage as gcs

        if self._client is None:
            self._client = gcs.Client()
        bucket, _, name = path[len("gs://") :].partition("/")
        return self._client.bucket(bucket).blob(name)

    def create(self, path: str, text: str):
        from google.api_core import exceptions

        blob = self._blob(path)
        try:
            blob.upload_from_string(text, if_generation_match=0)
        except exceptions.PreconditionFailed:
            return None
        return blob.generation

    def read(self, path: str) -> tuple[str | None, object]:
        from google.api_core import exceptions

        blob = self._blob(path)
        try:
            text = blob.download_as_text()
        except exceptions.NotFound:
            return None, None
        return text, blob.generation

    def delete(self, path: str, token) -> None:
        from google.api_core import exceptions

        try:
            self._blob(path).delete(if_generation_match=token)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass


class GfileLockBackend:
    """Best effort for schemes without an atomic create: check, then write (races possible)."""

    def create(self, path: str, text: str):
        import tensorflow as tf

        if tf.io.gfile.exists(path):
            return None
        _LOGGER.warning("%s: this filesystem has no atomic create; the lock is best effort", path)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return text

    def read(self, path: str) -> tuple[str | None, object]:
        import tensorflow as tf

        try:
            with tf.io.gfile.GFile(path) as f:
                text = f.read()
        except tf.errors.NotFoundError:
            return None, None
        return text, text

    def delete(self, path: str, token) -> None:
        import tensorflow as tf

        text, _ = self.read(path)
        if text == token:
            tf.io.gfile.remove(path)


def backend_for(directory: str) -> RemoteLockBackend:
    """The lock store for a remote dir's scheme."""
    return GcsLockBackend() if directory.startswith("gs://") else GfileLockBackend()
