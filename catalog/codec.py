"""The vector codec of the catalog database: how an embedding (and an encoder's centering vector)
is stored in a BLOB column.

One format for every row, on every machine: the D components as IEEE-754 float32 in
little-endian byte order (NumPy dtype ``<f4``), 4 x D bytes, no header.  Written by ``add``,
``import``, ``rebuild`` (and its Ray actors' transport), read by recognition, ``rebuild``
and ``check``; a big-endian host reads the same bytes correctly because the dtype is explicit.
"""

from __future__ import annotations

import numpy as np

#: dtype of a stored vector: float32, little-endian.
VECTOR_DTYPE = np.dtype("<f4")


def encode_vector(vector: np.ndarray) -> bytes:
    """The BLOB of one vector.

    Args:
        vector: (D,) array of any float dtype (converted to float32).

    Returns:
        4 x D bytes (:data:`VECTOR_DTYPE`).

    Raises:
        ValueError: not a 1-D array.
    """
    v = np.asarray(vector)
    if v.ndim != 1:
        raise ValueError(f"a stored vector is 1-D, got shape {v.shape}")
    return v.astype(VECTOR_DTYPE, copy=False).tobytes()


def encode_vectors(vectors: np.ndarray) -> bytes:
    """The concatenated BLOB of K vectors (row after row), e.g. for Ray's transport of one
    reference's (K, D) views.

    Args:
        vectors: (K, D) array of any float dtype.

    Returns:
        4 x K x D bytes.
    """
    return np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE).tobytes()


def decode_vector(blob: bytes, dim: int | None = None) -> np.ndarray:
    """One stored vector as float32 (D,), native byte order, writable (a copy).

    Args:
        blob: 4 x D bytes as written by :func:`encode_vector`.
        dim: expected D (None: any).

    Raises:
        ValueError: a length that is not a multiple of 4 or not 4 x ``dim`` bytes.
    """
    if len(blob) % VECTOR_DTYPE.itemsize or (dim is not None and len(blob) != VECTOR_DTYPE.itemsize * dim):
        want = "a multiple of 4" if dim is None else str(VECTOR_DTYPE.itemsize * dim)
        raise ValueError(f"a stored vector of {len(blob)} bytes; expected {want}")
    return np.frombuffer(blob, VECTOR_DTYPE).astype(np.float32)


def decode_vectors(blob: bytes, dim: int) -> np.ndarray:
    """K concatenated vectors as float32 (K, D) (see :func:`encode_vectors`).

    Raises:
        ValueError: a length that is not a multiple of 4 x ``dim``.
    """
    if dim < 1 or len(blob) % (VECTOR_DTYPE.itemsize * dim):
        raise ValueError(f"{len(blob)} bytes are not whole vectors of dimension {dim}")
    return np.frombuffer(blob, VECTOR_DTYPE).astype(np.float32).reshape(-1, dim)
