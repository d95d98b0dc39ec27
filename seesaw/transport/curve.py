"""CURVE keys for the daemon's socket, which addresses need them, and where the daemon listens by
default: small helpers over pyzmq, no I/O beyond the key files and the socket folder."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import zmq
from zmq.utils import z85

PUBLIC_NAME = "server.key"
SECRET_NAME = "server.key_secret"
KEY_CHARS = 40  # a 32-byte CURVE key in Z85 text
Z85_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def write_keys(folder: Path) -> tuple[Path, Path]:
    """Write a fresh key pair into `folder`: `server.key` (the public key, for clients) and
    `server.key_secret` (both keys, mode 0600, for the server); returns (public path, secret path).
    Existing key files are never overwritten."""
    folder = Path(folder)
    public_path, secret_path = folder / PUBLIC_NAME, folder / SECRET_NAME
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists: keys are never overwritten; "
                                  f"remove the old pair or pick another folder")
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    _write_new(secret_path, f"public={public.decode()}\nsecret={secret.decode()}\n", mode=0o600)
    _write_new(public_path, public.decode() + "\n", mode=0o644)
    return public_path, secret_path


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` (failing if it appeared meanwhile) with `mode` from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, mode)  # the umask may have taken bits away; the mode is meant exactly
        file.write(text)


def read_secret(path: Path | str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `server.key_secret` file written by `write_keys`."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the secret key file {path}: {error}") from None
    fields = dict(line.strip().partition("=")[::2] for line in text.splitlines() if line.strip())
    missing = [name for name in ("public", "secret") if name not in fields]
    if missing:
        raise ValueError(f"{path} is not a key file from `seesaw-cli keys`: no {' or '.join(missing)}= line")
    public, secret = (_checked_key(fields[name], f"the {name} key in {path}") for name in ("public", "secret"))
    if zmq.curve_public(secret) != public:
        raise ValueError(f"the public and secret keys in {path} are not one pair")
    return public, secret


def read_public(value: str) -> bytes:
    """The server's public Z85 key from `value`: a path to its `server.key` file, or the
    40-character Z85 text itself."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the server key file {path}: {error}") from None
        return _checked_key(text, f"the server key file {path}")
    if len(value) == KEY_CHARS and set(value) <= Z85_ALPHABET:
        return _checked_key(value, "the server key")
    raise ValueError(f"server key {value!r} is neither a key file nor a {KEY_CHARS}-character Z85 key")


def _checked_key(text: str, what: str) -> bytes:
    if len(text) != KEY_CHARS or not set(text) <= Z85_ALPHABET:
        raise ValueError(f"{what} is not a {KEY_CHARS}-character Z85 CURVE key")
    try:
        z85.decode(text.encode())
    except (ValueError, struct.error):
        raise ValueError(f"{what} is not a valid Z85 CURVE key") from None
    return text.encode()


def secure_server(socket: zmq.Socket, secret_path: Path | str) -> None:
    """Make `socket` (before it binds) a CURVE server with the key pair in `secret_path`."""
    public, secret = read_secret(secret_path)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def secure_client(socket: zmq.Socket, server_public: bytes) -> None:
    """Make `socket` (before it connects) a CURVE client of the server with `server_public`, under
    a fresh key pair of its own."""
    public, secret = zmq.curve_keypair()
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def default_address(environ: Mapping[str, str] | None = None) -> str:
    """Where the daemon listens unless told otherwise: `ipc://$XDG_RUNTIME_DIR/seesaw/seesaw.sock`
    when that folder is set and writable, else `ipc://<temp dir>/seesaw-<uid>/seesaw.sock`."""
    environ = os.environ if environ is None else environ
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK | os.X_OK):
        return f"ipc://{Path(runtime) / 'seesaw' / 'seesaw.sock'}"
    return f"ipc://{Path(tempfile.gettempdir()) / f'seesaw-{os.getuid()}' / 'seesaw.sock'}"


def ensure_socket_folder(address: str) -> None:
    """For an ipc:// address, create the folder its socket goes in (mode 0700 for folders made
    here); other addresses need nothing."""
    if not address.startswith("ipc://") or address.startswith("ipc://@"):  # @: abstract, no file
        return
    folder = Path(address.removeprefix("ipc://")).parent
    if folder.is_dir():
        return
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # mkdir's mode passes through the umask


def no_socket_hint(address: str) -> str:
    """For an ipc:// address whose socket file does not exist (no server is there), a note that
    says so; otherwise ''."""
    path = address.removeprefix("ipc://")
    if address.startswith("ipc://") and not path.startswith("@") and not Path(path).exists():
        return f" (there is no socket at {path}: is `seesaw-cli serve` running?)"
    return ""
