"""Reading PyTorch state dicts saved in the legacy (pre-1.6, non-zip) format, without torch.

A ``.pth`` file is untrusted input: unpickling it with :mod:`pickle` can run arbitrary code. This
module unpickles with a restricted :class:`pickle.Unpickler` that resolves only the few globals a
state dict of tensors needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter`` and the ``torch.*Storage`` types), each mapped to a local
stand-in; any other global raises :class:`pickle.UnpicklingError`. Storage bytes are read with
numpy.

Legacy layout (``torch.save(..., _use_new_zipfile_serialization=False)``), all in one stream:

1. a pickle of the magic number ``0x1950A86A20F9469CFC6C``;
2. a pickle of the protocol version (1001);
3. a pickle of ``sys_info`` (``little_endian``, type sizes);
4. the main pickle; tensors refer to storages through persistent ids
   ``("storage", storage_type, key, location, numel, view_metadata)``;
5. a pickle of the list of storage keys;
6. for each key in that order: an int64 element count, then the raw element bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage type name -> numpy element type (byte order applied from sys_info).
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _Restricted:
    """Base for stand-ins the pickle may create: refuses ``BUILD`` (no attribute injection)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to set state on {type(self).__name__}")


class _StorageType(_Restricted):
    """Stand-in for ``torch.FloatStorage`` & co: only names an element type; not callable."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage(_Restricted):
    """A storage declared by a persistent id; its data is read after the main pickle."""

    __slots__ = ("dtype", "numel", "data")

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _StorageView(_Restricted):
    """A slice ``[offset, offset + numel)`` of a root storage (legacy ``view_metadata``)."""

    __slots__ = ("root", "offset", "numel")

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root = root
        self.offset = offset
        self.numel = numel


class _TensorRef(_Restricted):
    """A tensor waiting for its storage bytes: storage, offset, shape and strides (in elements)."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints")
    return value


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> _TensorRef:
    if not isinstance(storage, _Storage | _StorageView):
        raise pickle.UnpicklingError("_rebuild_tensor_v2: first argument is not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError("_rebuild_tensor_v2: bad storage offset")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("_rebuild_tensor_v2: size and stride differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("_rebuild_parameter: argument is not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; storages come from persistent ids."""

    def __init__(self, file: BinaryIO, byteorder: str = "<"):
        super().__init__(file)
        self.byteorder = byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: not part of a tensor state dict"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage" or len(pid) != 6:
            raise pickle.UnpicklingError(
                f"unsupported persistent id of kind {kind!r}: only tensor storages are allowed"
            )
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("persistent id does not name a torch storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("malformed storage persistent id")
        dtype = np.dtype(self.byteorder + _STORAGE_DTYPES[storage_type.name])
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _Storage(dtype, numel)
        elif root.dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key!r} declared with two element types")
        if view_metadata is None:
            return root
        _view_key, offset, view_numel = view_metadata
        if not all(isinstance(v, int) and v >= 0 for v in (offset, view_numel)):
            raise pickle.UnpicklingError("malformed storage view metadata")
        return _StorageView(root, offset, view_numel)


def _to_array(ref: _TensorRef, name: str) -> np.ndarray:
    if isinstance(ref.storage, _StorageView):
        flat = ref.storage.root.data[ref.storage.offset : ref.storage.offset + ref.storage.numel]
        if flat.size != ref.storage.numel:
            raise ValueError(f"{name}: storage view runs past its storage")
    else:
        flat = ref.storage.data
    if any(n == 0 for n in ref.shape):
        return np.zeros(ref.shape, flat.dtype)
    # State dicts never hold broadcast (stride-0) tensors larger than their storage; refusing
    # them keeps a few bytes of pickle from asking for an arbitrarily large copy.
    if int(np.prod(ref.shape, dtype=object)) > flat.size:
        raise ValueError(f"{name}: tensor of shape {ref.shape} has more elements than its storage")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= flat.size:
        raise ValueError(f"{name}: tensor of shape {ref.shape} runs past its storage")
    base = flat[ref.offset :]
    strides = tuple(s * flat.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(base, ref.shape, strides, writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True)


def _read_exact(f: BinaryIO, nbytes: int, remaining: int, what: str) -> bytes:
    if nbytes > remaining:
        raise ValueError(f"truncated file: {what} needs {nbytes} bytes, {remaining} left")
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"truncated file while reading {what}")
    return data


def _load_stream(f: BinaryIO) -> dict[str, np.ndarray]:
    start = f.tell()
    head = f.read(4)
    f.seek(start)
    if head[:2] == b"PK":
        raise ValueError(
            "this is a zip-format torch file (torch>=1.6 default); only the legacy format is "
            "supported: re-save with torch.save(..., _use_new_zipfile_serialization=False)"
        )
    end = f.seek(0, io.SEEK_END)
    f.seek(start)

    try:
        magic = _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"not a legacy torch file: {e}") from e
    if magic != MAGIC_NUMBER:
        raise ValueError("not a legacy torch file: wrong magic number")
    version = _RestrictedUnpickler(f).load()
    if version != PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy torch protocol version {version!r}")
    sys_info = _RestrictedUnpickler(f).load()
    little = not isinstance(sys_info, Mapping) or sys_info.get("little_endian", True)
    byteorder = "<" if little else ">"

    unpickler = _RestrictedUnpickler(f, byteorder)
    result = unpickler.load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise pickle.UnpicklingError("storage key list is malformed")
    count_dtype = np.dtype(byteorder + "i8")
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise ValueError(f"storage {key!r} listed but never referenced")
        if storage.data is not None:
            raise ValueError(f"storage {key!r} listed twice")
        remaining = end - f.tell()
        (numel,) = np.frombuffer(_read_exact(f, 8, remaining, "a storage size"), count_dtype)
        if int(numel) != storage.numel:
            raise ValueError(f"storage {key!r}: {numel} elements on disk, {storage.numel} declared")
        nbytes = storage.numel * storage.dtype.itemsize
        raw = _read_exact(f, nbytes, remaining - 8, f"storage {key!r}")
        storage.data = np.frombuffer(raw, storage.dtype)
    missing = [k for k, s in unpickler.storages.items() if s.data is None]
    if missing:
        raise ValueError(f"storages referenced but not stored: {missing[:5]}")

    if not isinstance(result, Mapping):
        raise ValueError(f"expected a state dict (a mapping), got {type(result).__name__}")
    tensors: dict[str, np.ndarray] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise ValueError(f"state dict entry {name!r} is not a named tensor")
        tensors[name] = _to_array(value, name)
    return tensors


def load_state_dict(source: str | os.PathLike | BinaryIO) -> dict[str, np.ndarray]:
    """Reads a legacy-format torch state dict of tensors as numpy arrays, without torch.

    Args:
      source: a file path or a seekable binary file object positioned at the start of the data.

    Returns:
      Parameter and buffer name -> array (a native-byte-order copy), in file order.

    Raises:
      pickle.UnpicklingError: the pickle references a global or persistent id outside the small
        allow-list a tensor state dict needs (e.g. ``os.system``), or is malformed.
      ValueError: the file is not a legacy torch file, is truncated, or holds something other
        than a flat mapping of names to tensors.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return _load_stream(f)
    return _load_stream(source)
