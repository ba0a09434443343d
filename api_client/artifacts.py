"""The artifact store: arrays too big for a Celery message, as safetensors files.

Uploaded input embeddings and full-logits outputs live here; jobs and the
``artifacts`` table refer to them by URI and sha256 (of the file's bytes), so a
reader can tell when a file changed. The store is a local directory by default
(``$LOGPROBE_HOME/artifacts``) or any fsspec URL (``s3://bucket/prefix``,
``gs://...``) set with ``LOGPROBE_ARTIFACTS_URL``; every client and worker that
shares jobs must be able to reach it.

Files are safetensors (never pickle), written from numpy with
``safetensors.numpy``. Torch tensors are accepted by duck typing
(``.detach().cpu().numpy()``); this module never imports torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from .errors import ArtifactError, SpecError
from .settings import Settings, mask_url

#: Subdirectories of the store, by what they hold.
EMBEDDINGS_DIR = "embeddings"
LOGITS_DIR = "logits"


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """Where an array lives and what it is: enough to fetch and verify it."""

    uri: str
    sha256: str
    shape: tuple[int, ...]
    dtype: str
    num_bytes: int


def to_numpy(array: Any) -> np.ndarray:
    """A numpy copy of a numpy array, a torch tensor (duck-typed) or nested lists."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # a torch tensor
        tensor = array.detach().cpu()
        if str(getattr(tensor, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            tensor = tensor.float()
        array = tensor.numpy()
    return np.ascontiguousarray(np.asarray(array))


def encode(name: str, array: np.ndarray) -> bytes:
    """The safetensors bytes of one named array."""
    return _st_save({name: np.ascontiguousarray(array)})


def decode(data: bytes) -> dict[str, np.ndarray]:
    """The arrays in safetensors bytes; :class:`ArtifactError` if they are not safetensors."""
    try:
        return _st_load(data)
    except Exception as exc:
        raise ArtifactError(f"not a readable safetensors file: {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_path(url: str) -> Path | None:
    """The filesystem path of a plain path or ``file://`` URL; None for other schemes."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(url).expanduser().resolve()
    return None


def read_bytes(uri: str) -> bytes:
    """The bytes at ``uri`` (a path, ``file://`` URL or any fsspec URL)."""
    path = _local_path(uri)
    try:
        if path is not None:
            return path.read_bytes()
        import fsspec

        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ArtifactError(
            f"artifact {mask_url(uri)} does not exist (deleted or moved?)") from None
    except OSError as exc:
        raise ArtifactError(f"could not read artifact {mask_url(uri)}: {exc}") from None


def load_array(uri: str, sha256: str | None = None) -> np.ndarray:
    """The single array stored at ``uri``, after checking the file's sha256 if given."""
    data = read_bytes(uri)
    if sha256 is not None and sha256_hex(data) != sha256:
        raise ArtifactError(
            f"artifact {mask_url(uri)} has sha256 {sha256_hex(data)}, not the recorded {sha256}: "
            "the file changed after it was written"
        )
    arrays = decode(data)
    if len(arrays) != 1:
        raise ArtifactError(f"artifact {mask_url(uri)} holds {len(arrays)} tensors; "
                            "expected exactly one")
    return next(iter(arrays.values()))


class ArtifactStore:
    """A directory or fsspec URL that arrays are written to and read from."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(settings.resolved_artifacts_url())

    def __repr__(self) -> str:
        return f"ArtifactStore({mask_url(self.url)!r})"

    def uri_for(self, relative: str) -> str:
        path = _local_path(self.url)
        if path is not None:
            return (path / relative).as_uri()
        return f"{self.url}/{relative}"

    def contains(self, uri: str) -> bool:
        """Whether ``uri`` names a file inside this store (workers read only those)."""
        root, path = _local_path(self.url), _local_path(uri)
        if root is not None or path is not None:
            return root is not None and path is not None and \
                path.resolve().is_relative_to(root.resolve())
        return uri.startswith(self.url + "/") and ".." not in uri.split("/")

    def put_bytes(self, relative: str, data: bytes) -> str:
        """Write ``data`` at ``relative`` under the store (atomically on a local disk)."""
        path = _local_path(self.url)
        try:
            if path is not None:
                target = path / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                    tmp.write(data)
                os.replace(tmp.name, target)
                return target.as_uri()
            import fsspec

            uri = self.uri_for(relative)
            fs, fs_path = fsspec.core.url_to_fs(uri)
            fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(fs_path, data)
            return uri
        except OSError as exc:
            raise ArtifactError(f"could not write to the artifact store "
                                f"{mask_url(self.url)}: {exc}") from None

    def put_array(self, directory: str, name: str, array: Any, *,
                  filename: str | None = None) -> ArtifactRef:
        """Store one array as safetensors; content-addressed unless ``filename`` is given."""
        values = to_numpy(array)
        data = encode(name, values)
        digest = sha256_hex(data)
        uri = self.put_bytes(f"{directory}/{filename or digest}.safetensors", data)
        return ArtifactRef(uri=uri, sha256=digest, shape=tuple(values.shape),
                           dtype=str(values.dtype), num_bytes=len(data))


def embedding_array(array: Any) -> np.ndarray:
    """Check and normalise a user's input embedding to a finite ``[seq, hidden]`` float array.

    Raises :class:`SpecError` naming what to change.
    """
    values = to_numpy(array)
    if values.ndim == 3:
        if values.shape[0] != 1:
            raise SpecError(
                f"embedding: shape {list(values.shape)} has a batch of {values.shape[0]}; "
                "pass one sequence, [seq, hidden] or [1, seq, hidden]"
            )
        values = values[0]
    if values.ndim != 2 or 0 in values.shape:
        raise SpecError(
            f"embedding: shape {list(values.shape)} is not [seq, hidden] or [1, seq, hidden]"
        )
    if values.dtype not in (np.float16, np.float32, np.float64):
        raise SpecError(
            f"embedding: dtype {values.dtype} is not a float type; pass float16, float32 or "
            "float64 (bfloat16 torch tensors are converted to float32)"
        )
    if not np.isfinite(values).all():
        raise SpecError("embedding: the array holds NaN or infinite values")
    return np.ascontiguousarray(values)
