"""A DiT checkpoint's container, checked before anything is built from it (README "When things go wrong").

A truncated or corrupt file is one CheckpointError naming the file and what is wrong, found from the
file's size and its own bookkeeping alone: a .safetensors file's 8-byte length, JSON header and every
tensor's `data_offsets`; a torch.save .pt's zip records (local headers and central directory). Nothing is
unpickled, no tensor is read, no model is built, and torch is not imported, so every rank of a job can refuse
a broken file in milliseconds, before any of them joins the process group or allocates the DiT.
"""
import json
import math
import struct
import zipfile
from pathlib import Path


class CheckpointError(ValueError):
    """A DiT checkpoint that does not fit the model (missing/extra/misshaped key, unreadable file)."""


# Bytes per element of safetensors' dtypes (a dtype not listed is only range-checked).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_LOCAL, _CENTRAL = b"PK\x03\x04", b"PK\x01\x02"  # zip signatures: a record's local header, the directory
_LOCAL_HEADER = struct.Struct("<4s2xH6xIIIHH")  # signature, flags, crc, compressed size, size, name len, extra len
# The closing directory's signatures (entry, zip64 end record and locator, end record), looked for in the last bytes.
_DIRECTORY, _TAIL = (_CENTRAL, b"PK\x06\x06", b"PK\x06\x07", b"PK\x05\x06"), 1 << 16


def check_checkpoint_file(path, what="DiT checkpoint") -> None:
    """Raise CheckpointError when `path` (.safetensors, else a torch.save file) is truncated or corrupt."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            problem = _safetensors_problem(f, size) if path.suffix == ".safetensors" else _torch_problem(f, size)
    except OSError as err:
        problem = f"{type(err).__name__}: {err.strerror or err}"
    if problem:
        raise CheckpointError(f"cannot read {what} {path}: {problem}")


def check_dit_checkpoint(dit_path, quantize="none") -> None:
    """Check the files a DiT load from `dit_path` may read, those present: its .safetensors copy when there is
    one (k4flash/weights.py `preferred_checkpoint`), else the file itself; with quantize="fp8", its FP8
    conversion too."""
    from .fp8 import fp8_sibling
    from .weights import preferred_checkpoint

    candidates = [preferred_checkpoint(dit_path)] + ([fp8_sibling(dit_path)] if quantize == "fp8" else [])
    for path in candidates:
        if path.is_file():
            check_checkpoint_file(path)


def _safetensors_problem(f, size):
    if size < 8:
        return (f"the file is truncated: it has {size} byte(s), fewer than the 8-byte header length a .safetensors "
                "file starts with")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > _MAX_HEADER:
        return f"not a safetensors file: its first 8 bytes give a {length}-byte header (at most {_MAX_HEADER})"
    if 8 + length > size:
        return (f"the file is truncated: its header length says a {length}-byte JSON header follows, the file has "
                f"{size - 8} byte(s) after it")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError) as err:
        return f"its {length}-byte JSON header is corrupt ({err})"
    if not isinstance(header, dict):
        return f"its JSON header is a {type(header).__name__}, not a safetensors header"
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        problem = _entry_problem(key, info)
        if problem:
            return f"its header is corrupt: {problem}"
        spans.append((*info["data_offsets"], key))
    data = size - 8 - length
    end = 0
    for begin, stop, key in sorted(spans):  # the tensors tile the data: each starts where the one before ends
        if begin != end:
            where = (f"lies at bytes {begin}..{stop} of the tensor data, past its end ({data} bytes)" if stop > data
                     else f"starts at byte {begin} of the tensor data, not at byte {end} where "
                     f"{'the tensor before it ends' if end else 'the data starts'}")
            return f"its header is corrupt: tensor {key!r} {where}"
        end = stop
    if end > data:
        cut = next(key for _, stop, key in sorted(spans) if stop > data)
        return (f"the file is truncated: its header says {end} bytes of tensor data, the file has {data} "
                f"({end - data} missing, from tensor {cut!r} on)")
    if end < data:
        return f"the file has {data - end} byte(s) after the last tensor its header names (corrupt, or not safetensors)"
    return None


def _entry_problem(key, info):
    """Why one header entry is malformed, or None."""
    if not isinstance(info, dict):
        return f"entry {key!r} is not a tensor description"
    shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        return f"tensor {key!r} has no valid shape ({shape!r})"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"tensor {key!r} has invalid data_offsets {offsets!r}"
    if not isinstance(dtype, str):
        return f"tensor {key!r} has no dtype"
    if dtype in _ITEMSIZE and offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
        return (f"tensor {key!r} ({dtype}, shape {tuple(shape)}) needs {math.prod(shape) * _ITEMSIZE[dtype]} bytes, "
                f"its data_offsets {offsets} give {offsets[1] - offsets[0]}")
    return None


def _torch_problem(f, size):
    head = f.read(4)
    if not head:
        return "the file is empty"
    if not _LOCAL.startswith(head):
        if head[:1] == b"\x80":  # a pickle: torch.save's legacy (pre-1.6) format, which only torch.load can read
            return None
        return f"not a torch.save checkpoint: it starts with {head!r}, not a zip archive's {_LOCAL!r}"
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, ValueError, EOFError):  # no end-of-archive record where it belongs
        return _truncated_zip(f, size)
    with archive:
        infos = archive.infolist()
        if not any(info.filename.rsplit("/", 1)[-1] == "data.pkl" for info in infos):
            return "a zip archive, but not a torch.save checkpoint (it has no data.pkl record)"
        directory = getattr(archive, "start_dir", size)
        for info in infos:
            f.seek(info.header_offset)
            raw = f.read(_LOCAL_HEADER.size)
            if len(raw) < _LOCAL_HEADER.size or raw[:4] != _LOCAL:
                return (f"its zip directory is corrupt: record {info.filename!r} has no header at byte "
                        f"{info.header_offset}")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
            stop = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
            if stop > directory:
                return (f"its zip directory is corrupt: record {info.filename!r} would end at byte {stop}, past the "
                        f"records' end at byte {directory}")
    return None


def _truncated_zip(f, size):
    """What is missing from a torch.save archive that has lost its end-of-archive record (the last 22 bytes).

    Its records' sizes follow their data (torch writes data descriptors), so they cannot be walked from the
    start: where the file ends is told from its last bytes (inside the closing directory of records, or not)."""
    if size < _LOCAL_HEADER.size:
        return f"the file is truncated: it has {size} byte(s), less than one zip record's header"
    f.seek(max(0, size - _TAIL))
    tail = f.read()
    if any(signature in tail for signature in _DIRECTORY):
        return (f"the file is truncated: it has {size} bytes of a torch.save zip archive and ends inside the "
                "directory of records that closes it (its end-of-archive record is missing)")
    return (f"the file is truncated: it has {size} bytes of a torch.save zip archive and ends before the directory "
            "of records that closes it")
