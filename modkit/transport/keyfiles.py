"""A launch's keys on disk, for components started by hand on several hosts.

``Pipeline.launch`` makes its keys in memory and hands them to its children. Components
started one by one (``python -m modkit.worker --config pipeline.yaml --keys DIR``), on one
host or several, read the same keys from a directory that ``python -m modkit keys DIR``
wrote once and that is then copied to every host::

    DIR/                  mode 0700
      hmac.key            mode 0600   the HMAC-SHA256 key that signs control calls (hex)
      server.key_secret   mode 0600   the CURVE key pair every binding socket serves with
      client.key_secret   mode 0600   the CURVE key pair every connecting socket presents

The two ``*.key_secret`` files are ZeroMQ certificates (``zmq.auth.load_certificate``
reads them). Every component binds some sockets and connects to others, so every host
holds all three files: whoever holds them is a member of the pipeline. ``load_keys``
refuses a directory or file that another user could read or replace (any group or other
permission bit, or another owner than this user or root), as ssh refuses a private key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import zmq
import zmq.auth

from modkit.protocol import LaunchKeys
from modkit.transport.security import new_launch_keys

HMAC_FILE = "hmac.key"
SERVER_FILE = "server.key_secret"
CLIENT_FILE = "client.key_secret"
KEY_FILES = (HMAC_FILE, SERVER_FILE, CLIENT_FILE)


class KeyFileError(ValueError):
    """The keys directory is missing, incomplete, malformed, or open to other users."""


def write_keys(directory: str | os.PathLike[str]) -> LaunchKeys:
    """Make fresh keys and write them to ``directory`` (created with mode 0700 if missing).

    ``KeyFileError`` if it already holds any of the key files: a new key pair would lock
    out every component started with the old one, so an existing key is never overwritten.
    """
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path, is_dir=True)
    taken = [name for name in KEY_FILES if (path / name).exists()]
    if taken:
        raise KeyFileError(f"{path} already holds {', '.join(taken)}: remove them or choose another directory")
    keys = new_launch_keys()
    _write_private(path / HMAC_FILE, keys.secret + "\n")
    _write_private(path / SERVER_FILE, _certificate(keys.server_public, keys.server_secret, "servers"))
    _write_private(path / CLIENT_FILE, _certificate(keys.client_public, keys.client_secret, "clients"))
    return keys


def load_keys(directory: str | os.PathLike[str]) -> LaunchKeys:
    """The keys ``write_keys`` wrote to ``directory``; ``KeyFileError`` saying what is wrong."""
    path = Path(directory)
    if not path.is_dir():
        raise KeyFileError(f"{path} is not a directory; make one with: python -m modkit keys {path}")
    _check_private(path, is_dir=True)
    for name in KEY_FILES:
        if not (path / name).is_file():
            raise KeyFileError(f"{path} has no {name}; make a full set with: python -m modkit keys DIR")
        _check_private(path / name, is_dir=False)
    secret = (path / HMAC_FILE).read_text().strip()
    try:
        if len(bytes.fromhex(secret)) < 32:
            raise ValueError
    except ValueError:
        raise KeyFileError(f"{path / HMAC_FILE} must hold 32 or more bytes as hex") from None
    server_public, server_secret = _read_certificate(path / SERVER_FILE)
    client_public, client_secret = _read_certificate(path / CLIENT_FILE)
    return LaunchKeys(secret, server_public, server_secret, client_public, client_secret)


def _check_private(path: Path, *, is_dir: bool) -> None:
    """``KeyFileError`` unless only this user (or root) owns ``path`` and no one else may read or write it."""
    info = path.stat()
    if info.st_uid not in (os.getuid(), 0):
        raise KeyFileError(f"{path} belongs to another user (uid {info.st_uid}); keys must be yours")
    if stat.S_IMODE(info.st_mode) & 0o077:
        wanted = "0700" if is_dir else "0600"
        raise KeyFileError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: other users could read or replace the keys; "
            f"chmod {wanted} {path}"
        )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _certificate(public: str, secret: str, role: str) -> str:
    """A ZeroMQ secret certificate (ZPL, as ``zmq.auth.create_certificates`` writes one)."""
    return (
        f"#   ZeroMQ CURVE secret certificate: the key pair of the pipeline's {role} (modkit).\n"
        "#   Whoever holds this file can join the pipeline: copy it only to its hosts.\n"
        "\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{public}"\n'
        f'    secret-key = "{secret}"\n'
    )


def _read_certificate(path: Path) -> tuple[str, str]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as error:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate: {error}") from None
    if secret is None or len(public) != 40 or len(secret) != 40:
        raise KeyFileError(f"{path} must hold a CURVE public and secret key (40 Z85 characters each)")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: its public key does not belong to its secret key")
    return public.decode(), secret.decode()
