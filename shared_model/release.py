"""Signed model releases: the head's relevance tower as ONNX, a manifest, and its signature.

A release is one directory::

    head.onnx       relevance tower, input ``features`` [N, F] float32 -> output ``scores`` [N]
    evidence.npz    (optional) the memorised DP click evidence of the seen queries
                    (``shared_model.release_evidence``): a seen query is scored with it
    manifest.json   version, round, ε per node, metrics, feature names, head config,
                    created-at, and the sha256 of every other file in the release
    manifest.sig    raw 64-byte Ed25519 signature over the exact bytes of manifest.json

:func:`verify_release` trusts nothing it has not checked: the signature over the manifest
first, then every listed file's hash, then that no file is present that the manifest does not
list. :class:`ReleaseStore` keeps a node's installed releases and a pointer to the current
one; a release that fails verification never replaces the last good one. No Flower here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from shared_model.features import FEATURE_NAMES
from shared_model.ranker import RankerHead
from shared_model.release_evidence import EVIDENCE_FILE, ReleaseEvidence

__all__ = [
    "CURRENT_FILE",
    "FORMAT_VERSION",
    "KEY_DIR_ENV",
    "INPUT_NAME",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "ONNX_OPSET",
    "OUTPUT_NAME",
    "SIGNATURE_FILE",
    "KeyPermissionError",
    "Manifest",
    "ReleaseError",
    "ReleaseStore",
    "check_private_file",
    "default_public_key_path",
    "ensure_private_dir",
    "export_onnx",
    "generate_signing_key",
    "load_public_key",
    "load_signing_key",
    "read_manifest",
    "signing_key_dir",
    "load_verified_release",
    "verify_release",
    "write_private_file",
    "write_public_key",
    "write_release",
]

FORMAT_VERSION = 1
MODEL_FILE = "head.onnx"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
CURRENT_FILE = "current.json"
INPUT_NAME = "features"
OUTPUT_NAME = "scores"
ONNX_OPSET = 17

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ReleaseError(ValueError):
    """A release that must not be used: names the release, the file and the problem."""


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about a release.

    ``files`` maps each file name in the release (other than the manifest and its signature)
    to its sha256, hex.
    """

    version: str
    round: int
    epsilon_per_node: dict[str, float]
    metrics: dict[str, float]
    feature_names: tuple[str, ...]
    head_config: dict[str, Any]
    created_at: str
    files: dict[str, str]
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (the manifest's content)."""
        out = dataclasses.asdict(self)
        out["feature_names"] = list(self.feature_names)
        return out

    @classmethod
    def from_json(cls, obj: Any, *, where: str = MANIFEST_FILE) -> Manifest:
        """Parse and type-check a manifest object; :class:`ReleaseError` names the field."""
        if not isinstance(obj, dict):
            raise ReleaseError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(obj))
        extra = sorted(set(obj) - fields)
        if missing:
            raise ReleaseError(f"{where}: missing field(s) {missing}")
        if extra:
            raise ReleaseError(f"{where}: unknown field(s) {extra}")
        if obj["format"] != FORMAT_VERSION:
            raise ReleaseError(
                f"{where}: format {obj['format']!r} is not supported (expected {FORMAT_VERSION})"
            )
        version = obj["version"]
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise ReleaseError(f"{where}: bad version {version!r}")
        rnd = obj["round"]
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
            raise ReleaseError(f"{where}: bad round {rnd!r}")
        eps = _float_map(obj["epsilon_per_node"], f"{where}: epsilon_per_node", nonneg=True)
        metrics = _float_map(obj["metrics"], f"{where}: metrics", nonneg=False)
        names = obj["feature_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ReleaseError(f"{where}: feature_names must be a list of strings")
        if not isinstance(obj["head_config"], dict):
            raise ReleaseError(f"{where}: head_config must be an object")
        if not isinstance(obj["created_at"], str):
            raise ReleaseError(f"{where}: created_at must be a string")
        files = obj["files"]
        if not isinstance(files, dict):
            raise ReleaseError(f"{where}: files must be an object")
        for name, digest in files.items():
            _check_file_name(name, where)
            if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
                raise ReleaseError(f"{where}: files[{name!r}] is not a sha256 hex digest")
        if MODEL_FILE not in files:
            raise ReleaseError(f"{where}: files does not list {MODEL_FILE}")
        return cls(
            version=version,
            round=rnd,
            epsilon_per_node=eps,
            metrics=metrics,
            feature_names=tuple(names),
            head_config=dict(obj["head_config"]),
            created_at=obj["created_at"],
            files=dict(files),
            format=FORMAT_VERSION,
        )


def _float_map(obj: Any, where: str, *, nonneg: bool) -> dict[str, float]:
    if not isinstance(obj, Mapping):
        raise ReleaseError(f"{where} must be an object of numbers")
    out: dict[str, float] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ReleaseError(f"{where}: key {key!r} is not a string")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ReleaseError(f"{where}[{key!r}] = {value!r} is not a number")
        value = float(value)
        if not math.isfinite(value) or (nonneg and value < 0):
            raise ReleaseError(
                f"{where}[{key!r}] = {value!r} is not a finite number >= 0"
                if nonneg
                else f"{where}[{key!r}] = {value!r} is not finite"
            )
        out[key] = value
    return out


def _check_file_name(name: Any, where: str) -> None:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", MANIFEST_FILE, SIGNATURE_FILE)
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise ReleaseError(f"{where}: bad file name {name!r} in files")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (
        json.dumps(manifest.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    ).encode()


# --- ONNX export ---------------------------------------------------------------------------


class _RelevanceOnly(nn.Module):
    """``features [N, F] -> scores [N]``: the head's relevance tower, position tower dropped."""

    def __init__(self, head: RankerHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.relevance(features)


def export_onnx(head: RankerHead) -> bytes:
    """The head's relevance tower as ONNX bytes (legacy TorchScript exporter, opset 17).

    Input ``features`` ``[N, F]`` float32 with dynamic ``N``; output ``scores`` ``[N]``.
    The head is exported on a CPU copy, so the caller's head (and its train/eval mode) is
    left untouched.
    """
    module = _RelevanceOnly(_cpu_copy(head)).eval()
    example = torch.zeros(2, head.config.num_features, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated upstream but needs no onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter accepts a BytesIO
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "n"}, OUTPUT_NAME: {0: "n"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def _cpu_copy(head: RankerHead) -> RankerHead:
    copy = RankerHead(head.config)
    copy.load_state_dict({k: v.detach().to("cpu") for k, v in head.state_dict().items()})
    return copy.eval()


# --- writing -------------------------------------------------------------------------------


def write_release(
    directory: Path,
    *,
    head: RankerHead,
    version: str,
    round: int,  # noqa: A002 - the federated round, named as in the manifest
    epsilon_per_node: Mapping[str, float],
    metrics: Mapping[str, float],
    signing_key: Ed25519PrivateKey,
    evidence: ReleaseEvidence | None = None,
) -> Path:
    """Write a signed release into ``directory`` (which must not exist, or be empty).

    ``evidence`` (the memorised click evidence of the seen queries, already DP) is written as
    ``evidence.npz`` and listed in the manifest, so the signature covers it like the head.
    The release is assembled in a temporary sibling directory and renamed into place, so
    ``directory`` either holds a complete release or nothing.

    Returns
    -------
    Path
        ``directory``.
    """
    directory = Path(directory)
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ValueError(
            f"version must match {_VERSION_RE.pattern} (it names a directory), got {version!r}"
        )
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be an int >= 0, got {round!r}")
    try:
        eps = _float_map(dict(epsilon_per_node), "epsilon_per_node", nonneg=True)
        mets = _float_map(dict(metrics), "metrics", nonneg=False)
    except ReleaseError as exc:
        raise ValueError(str(exc)) from None
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"release directory {directory} already exists and is not empty")

    if evidence is not None and not isinstance(evidence, ReleaseEvidence):
        raise TypeError(f"evidence must be a ReleaseEvidence, got {type(evidence).__name__}")
    onnx_bytes = export_onnx(head)
    payload = {MODEL_FILE: onnx_bytes}
    if evidence is not None:
        payload[EVIDENCE_FILE] = evidence.to_bytes()
    manifest = Manifest(
        version=version,
        round=round,
        epsilon_per_node=eps,
        metrics=mets,
        feature_names=tuple(FEATURE_NAMES),
        head_config=dataclasses.asdict(head.config),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files={name: _sha256_bytes(data) for name, data in payload.items()},
    )
    manifest_bytes = _manifest_bytes(manifest)
    signature = signing_key.sign(manifest_bytes)

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name, data in payload.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
        (tmp / SIGNATURE_FILE).write_bytes(signature)
        tmp.chmod(0o755)
        if directory.exists():
            directory.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# --- keys ----------------------------------------------------------------------------------


class KeyPermissionError(ReleaseError):
    """A private key file (or its folder) that others could read: refused, never used."""


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing folder is kept."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask only
    return path


def check_private_file(path: Path) -> Path:
    """Refuse a private key file that is not a regular file owned by us, mode 0600 or
    narrower (no group or world bits). Symlinks are refused too (``lstat``)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise KeyPermissionError(f"{path}: private key not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyPermissionError(f"{path}: private key is not a regular file (symlink?)")
    if st.st_mode & 0o077:
        raise KeyPermissionError(
            f"{path}: private key is readable by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` if it was never exposed, "
            "else replace the key"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KeyPermissionError(f"{path}: private key is owned by uid {st.st_uid}, not by us")
    return path


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to a new file ``path`` created with ``O_CREAT|O_EXCL`` and ``mode``.

    The file never exists with a wider mode, even for a moment, and an existing file is never
    overwritten (``FileExistsError``). Missing parent folders are created 0700.
    """
    path = Path(path)
    ensure_private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # in case the umask narrowed (or a platform widened) it
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return path


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file ``path`` (never overwriting), atomically, with ``mode``."""
    path = Path(path)
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write_private_file(tmp, data, mode)
    try:
        os.link(tmp, path)  # fails if path exists: a key is never overwritten
    finally:
        tmp.unlink(missing_ok=True)


# Where a run's release signing key lives: outside the run directory (which is handed around
# and is the nodes' drop folder). ``FEDRANK_KEY_DIR`` (set by ``fedrank server start`` from
# its ``[keys] dir``) wins; the default is the sibling folder ``RUN_DIR.keys``.
KEY_DIR_ENV = "FEDRANK_KEY_DIR"
SIGNING_KEY_FILE = "server-signing.pem"
PUBLIC_KEY_FILE = "server-signing.pub"


def signing_key_dir(run_dir: Path) -> Path:
    """The folder holding a run's release signing key (never inside ``run_dir``)."""
    env = os.environ.get(KEY_DIR_ENV)
    if env:
        return Path(env)
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f"{run_dir.name}.keys"


def default_public_key_path(run_dir: Path) -> Path:
    """Where the public half of a run's release signing key is written."""
    return signing_key_dir(run_dir) / PUBLIC_KEY_FILE


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 signing key at ``path`` (PKCS#8 PEM, mode 0600).

    Raises ``FileExistsError`` rather than overwrite an existing key.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_exclusive(Path(path), pem, 0o600)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM); :class:`ReleaseError` if it is anything else."""
    path = check_private_file(Path(path))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ReleaseError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
    return key


def write_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: Path) -> Path:
    """Write the public half of ``key`` to ``path`` (SubjectPublicKeyInfo PEM, mode 0644)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as fh:
        fh.write(pem)
    os.chmod(fh.name, 0o644)
    os.replace(fh.name, path)
    return path


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM); :class:`ReleaseError` if it is anything else."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ReleaseError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


# --- verifying -----------------------------------------------------------------------------


def read_manifest(directory: Path) -> Manifest:
    """Parse a release's manifest **without** checking its signature or files."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ReleaseError(f"release {directory}: {MANIFEST_FILE} is missing")
    return _parse_manifest(path.read_bytes(), str(path))


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{where}: not valid JSON ({exc})") from None
    return Manifest.from_json(obj, where=where)


MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 1 << 10
MAX_FILE_BYTES = 64 << 20  # a release file; the head's ONNX is well under 1 MiB


class _Missing(ReleaseError):
    pass


def _read_at(dir_fd: int, name: str, where: str, limit: int) -> bytes:
    """Read one file of a release once, relative to the open release folder: never through
    a symlink, only a regular file, at most ``limit`` bytes."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise _Missing(f"release {where}: {name} is missing") from None
    except OSError as exc:  # ELOOP: a symlink
        raise ReleaseError(f"release {where}: {name} is not a regular file ({exc.strerror})"
                           ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReleaseError(f"release {where}: {name} is not a regular file")
        if st.st_size > limit:
            raise ReleaseError(f"release {where}: {name} is larger than {limit} bytes")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ReleaseError(f"release {where}: {name} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_verified_release(
    directory: Path, public_key: Ed25519PublicKey, *, max_file_bytes: int = MAX_FILE_BYTES
) -> tuple[Manifest, dict[str, bytes]]:
    """Read a release once and check it end to end: ``(manifest, {file name: bytes})``.

    The folder is opened without following a symlink and every file is read exactly once,
    relative to that open folder, refusing symlinks, non-regular files and files over
    ``max_file_bytes``; all checks run on the bytes read, so what was verified is what the
    caller gets. Raises :class:`ReleaseError` naming the release and the problem when: the
    directory, manifest or signature is missing (an unsigned release); the signature does not
    verify under ``public_key`` (wrong key, or a tampered manifest); a listed file is missing,
    is not a regular file, or its sha256 differs (a tampered file); a file is present that the
    manifest does not list; or the release's features are not the ones this build computes.
    The returned mapping holds the manifest, the signature and every listed file.
    """
    directory = Path(directory)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise ReleaseError(f"release {directory}: not a directory") from None
    try:
        try:
            manifest_bytes = _read_at(dir_fd, MANIFEST_FILE, str(directory), MAX_MANIFEST_BYTES)
        except _Missing:
            raise ReleaseError(f"release {directory}: {MANIFEST_FILE} is missing") from None
        try:
            signature = _read_at(dir_fd, SIGNATURE_FILE, str(directory), MAX_SIGNATURE_BYTES)
        except _Missing:
            raise ReleaseError(
                f"release {directory} is unsigned: {SIGNATURE_FILE} is missing"
            ) from None
        try:
            public_key.verify(signature, manifest_bytes)
        except InvalidSignature:
            raise ReleaseError(
                f"release {directory}: {SIGNATURE_FILE} does not verify {MANIFEST_FILE} under "
                "the given public key (wrong key, or the manifest was tampered with)"
            ) from None
        manifest = _parse_manifest(manifest_bytes, str(directory / MANIFEST_FILE))
        files = {MANIFEST_FILE: manifest_bytes, SIGNATURE_FILE: signature}
        for name, expected in sorted(manifest.files.items()):
            try:
                data = _read_at(dir_fd, name, str(directory), max_file_bytes)
            except _Missing:
                raise ReleaseError(
                    f"release {directory}: {name} is listed in the manifest but missing"
                ) from None
            actual = _sha256_bytes(data)
            if actual != expected:
                raise ReleaseError(
                    f"release {directory}: {name} has sha256 {actual}, the manifest says "
                    f"{expected} (the file was tampered with or corrupted)"
                )
            files[name] = data
        allowed = set(manifest.files) | {MANIFEST_FILE, SIGNATURE_FILE}
        extra = sorted(n for n in os.listdir(dir_fd) if n not in allowed)
    finally:
        os.close(dir_fd)
    if extra:
        raise ReleaseError(
            f"release {directory}: file(s) not listed in the manifest: {', '.join(extra)}"
        )
    if manifest.feature_names != tuple(FEATURE_NAMES):
        raise ReleaseError(
            f"release {directory}: features {list(manifest.feature_names)} do not match this "
            f"build's {list(FEATURE_NAMES)}"
        )
    return manifest, files


def verify_release(directory: Path, public_key: Ed25519PublicKey) -> Manifest:
    """Check a release end to end and return its manifest (see
    :func:`load_verified_release`, which also returns the bytes it checked)."""
    return load_verified_release(directory, public_key)[0]


# --- a node's installed releases -----------------------------------------------------------


class ReleaseStore:
    """A node's installed releases: ``node_dir/releases/<version>/`` and a ``current.json``.

    ``current.json`` (``{"version": ..., "round": ...}``) is replaced atomically, so the node
    always points at one complete, verified release or at none.
    """

    def __init__(self, node_dir: Path) -> None:
        self.node_dir = Path(node_dir)
        self.releases_dir = self.node_dir / "releases"
        self.pointer = self.node_dir / CURRENT_FILE

    def _read_pointer(self) -> dict[str, Any] | None:
        if not self.pointer.exists():
            return None
        try:
            obj = json.loads(self.pointer.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReleaseError(f"{self.pointer}: not valid JSON ({exc})") from None
        version = obj.get("version") if isinstance(obj, dict) else None
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            raise ReleaseError(f"{self.pointer}: bad version {version!r}")
        return obj

    def current(self) -> Path | None:
        """Directory of the current release, or ``None`` when none was installed."""
        obj = self._read_pointer()
        if obj is None:
            return None
        path = self.releases_dir / obj["version"]
        if not path.is_dir():
            raise ReleaseError(f"{self.pointer} points at {path}, which is missing")
        return path

    def current_version(self) -> str | None:
        """Version of the current release, or ``None``."""
        obj = self._read_pointer()
        return None if obj is None else obj["version"]

    def current_round(self) -> int:
        """Federated round of the current release (0 when none is installed)."""
        obj = self._read_pointer()
        rnd = None if obj is None else obj.get("round")
        return rnd if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 0 else 0

    def install(
        self,
        candidate_dir: Path,
        public_key: Ed25519PublicKey,
        *,
        allow_downgrade: bool = False,
    ) -> Manifest:
        """Verify ``candidate_dir``, copy it in, and make it current.

        A release that fails verification raises :class:`ReleaseError` and leaves the current
        release as it was. So does a release from an earlier federated round than the current
        one (a replayed old release) unless ``allow_downgrade``, and a version that is already
        installed with different content (versions are immutable).
        """
        manifest, files = load_verified_release(candidate_dir, public_key)
        return self.install_loaded(
            candidate_dir, manifest, files, public_key, allow_downgrade=allow_downgrade
        )

    def install_loaded(
        self,
        candidate_dir: Path,
        manifest: Manifest,
        files: Mapping[str, bytes],
        public_key: Ed25519PublicKey,
        *,
        allow_downgrade: bool = False,
    ) -> Manifest:
        """Install what :func:`load_verified_release` returned for ``candidate_dir`` (so the
        candidate is read once); same rules as :meth:`install`."""
        current = self._read_pointer()
        if (
            current is not None
            and not allow_downgrade
            and isinstance(current.get("round"), int)
            and manifest.round < current["round"]
        ):
            raise ReleaseError(
                f"release {candidate_dir}: round {manifest.round} is older than the current "
                f"release {current['version']!r} (round {current['round']}); refusing a "
                "downgrade"
            )
        self.releases_dir.mkdir(parents=True, exist_ok=True)
        target = self.releases_dir / manifest.version
        if target.exists():
            try:
                installed = verify_release(target, public_key)
            except ReleaseError:
                installed = None
            same = (
                installed is not None
                and (target / MANIFEST_FILE).read_bytes() == files[MANIFEST_FILE]
            )
            if not same:
                raise ReleaseError(
                    f"release {candidate_dir}: version {manifest.version!r} is already "
                    f"installed at {target} with different content"
                )
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.tmp-", dir=self.releases_dir))
            try:
                # Write the bytes that were verified (each candidate file was read once,
                # never through a symlink), then check the written copy.
                for name, data in files.items():
                    write_private_file(tmp / name, data, 0o644)
                copied = verify_release(tmp, public_key)
                if copied != manifest:
                    raise ReleaseError(f"release {candidate_dir} changed while it was installed")
                tmp.chmod(0o755)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self._write_pointer({"version": manifest.version, "round": manifest.round})
        return manifest

    def _write_pointer(self, obj: dict[str, Any]) -> None:
        self.node_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=self.node_dir, prefix=f".{CURRENT_FILE}.", delete=False
        ) as fh:
            json.dump(obj, fh, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(fh.name, self.pointer)
