"""KServe Open Inference Protocol v2 (REST, JSON) for this model: request parsing and
validation into arrays, and the response bodies. No torch or faiss here.

A request: {"id"?, "parameters"?: {"k": 20}, "inputs": [{"name", "shape": [N,28,28] or
[N,1,28,28], "datatype": "UINT8" (0-255) or "FP32" (0-1), "data": row-major, flat or
nested}], "outputs"?: [{"name"}]}. Every problem is a ProtocolError with an HTTP status
and a message that says what was wrong.

The binary data extension (KServe and Triton clients' ``binary_data=True``) is accepted
too: the ``Inference-Header-Content-Length`` header says how many bytes of the body are
the JSON; the tensor follows as raw row-major bytes (uint8, or little-endian float32),
its size in the input's ``parameters.binary_data_size``. Parsing 64 images as JSON
numbers costs more CPU than embedding them; as bytes it costs nothing.
"""
from __future__ import annotations

import json
import math

import numpy as np

from steps import evaluate

OUTPUTS = {"label": "INT64", "score": "FP32", "neighbor_labels": "INT64", "neighbor_distances": "FP32"}
DEFAULT_K = evaluate.DEFAULT_K   # the k the pipeline evaluated: one vote, evaluated as served


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def parse_infer(body: bytes, *, max_batch: int, max_k: int,
                json_length: str | None = None) -> tuple[np.ndarray, int | None, str | None, list[str]]:
    """(images float32 (N,1,28,28) in [0,1], k (None: not given, see default_k), request id,
    output names).
    json_length: the Inference-Header-Content-Length header, when the client sent one."""
    binary = None
    if json_length is not None:
        # ASCII digits only: str.isdigit() and int() also take other scripts' digits ('٣').
        if not (json_length.isascii() and json_length.isdigit()) or not 0 < int(json_length) <= len(body):
            raise _bad(f"Inference-Header-Content-Length must be a byte count from 1 to the body's "
                       f"{len(body)}, got {json_length!r}")
        body, binary = body[:int(json_length)], body[int(json_length):]
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"malformed JSON: {e}")
    except RecursionError:   # deeply nested arrays or objects: the parser's stack, not ours
        raise _bad("malformed JSON: nested too deeply")
    if not isinstance(req, dict):
        raise _bad("the request body must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad("'inputs' must be a list holding exactly one tensor (the images)")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad("'id' must be a string")
    k = _parse_k(req.get("parameters"), max_k)
    outputs = _parse_outputs(req.get("outputs"))
    # A bool anywhere is rare; scan for one only when the body could hold one.
    maybe_bool = b"true" in body or b"false" in body
    return _parse_tensor(inputs[0], max_batch, maybe_bool, binary), k, rid, outputs


def default_k(gallery_size: int) -> int:
    """The k of a request that names none: the evaluated DEFAULT_K, or every gallery image
    when there are fewer (an explicit k over the gallery's size is refused instead)."""
    return max(1, min(DEFAULT_K, gallery_size))


def _parse_k(params, max_k: int) -> int | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    if "k" not in params:
        return None
    k = params["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise _bad(f"parameter k must be an integer from 1 to {max_k}, got {k!r}")
    return k


def _parse_outputs(outputs) -> list[str]:
    if outputs is None:
        return list(OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise _bad("'outputs' must be a list of {\"name\": ...} objects")
    names = [o.get("name") for o in outputs]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise _bad(f"unknown output {unknown[0]!r}: this model has {', '.join(OUTPUTS)}")
    return names


def _parse_tensor(t: dict, max_batch: int, maybe_bool: bool = True, binary: bytes | None = None) -> np.ndarray:
    name = t.get("name", "input")
    shape, dtype, data = t.get("shape"), t.get("datatype"), t.get("data")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or tuple(shape[1:]) not in ((28, 28), (1, 28, 28))):
        raise _bad(f"input {name!r}: shape must be [N,28,28] or [N,1,28,28], got {shape!r}")
    n = shape[0]
    if n < 1:
        raise _bad(f"input {name!r}: batch size must be at least 1, got {n}")
    if n > max_batch:
        raise _bad(f"input {name!r}: batch of {n} images is over the maximum of {max_batch}")
    if dtype not in ("UINT8", "FP32"):
        raise _bad(f"input {name!r}: datatype must be UINT8 (0-255) or FP32 (0-1), got {dtype!r}")
    want = math.prod(shape)
    if binary is not None:
        return _binary_tensor(t, name, dtype, n, want, binary)
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: 'data' must be a JSON array of numbers")
    if dtype == "UINT8" and len(data) == want and not maybe_bool:
        try:   # flat integers 0-255: bytes() checks them all in C, 4x faster than np.array
            return (np.frombuffer(bytes(data), np.uint8) / 255.0).astype(np.float32).reshape(n, 1, 28, 28)
        except (ValueError, TypeError):
            pass   # the general path below says what is wrong
    try:
        # No dtype given: numpy would turn the string "7" into the number 7. Strings come
        # out as a text array, a ragged nesting fails.
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None
    if arr is None or arr.dtype.kind not in "biuf":
        raise _bad(f"input {name!r}: 'data' must hold only numbers (not strings), in a flat or evenly nested array")
    # float64 keeps every JSON number exact enough to check.
    arr = arr.astype(np.float64)
    if arr.size != want:
        raise _bad(f"input {name!r}: data has {arr.size} values but shape {shape} needs {want}")
    if maybe_bool and _has_bool(data):
        raise _bad(f"input {name!r}: 'data' must hold numbers, not true/false")
    if not np.isfinite(arr).all():
        raise _bad(f"input {name!r}: data holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if dtype == "UINT8":
        if lo < 0 or hi > 255:
            raise _bad(f"input {name!r}: UINT8 values must be 0-255, got {lo:g} to {hi:g}")
        if not (arr == np.floor(arr)).all():
            raise _bad(f"input {name!r}: UINT8 values must be integers")
        arr = arr / 255.0
    elif lo < 0 or hi > 1:
        raise _bad(f"input {name!r}: FP32 values must be in [0, 1] (scale 0-255 pixels by 1/255 "
                   f"or send UINT8), got {lo:g} to {hi:g}")
    return arr.astype(np.float32).reshape(n, 1, 28, 28)


def _binary_tensor(t: dict, name: str, dtype: str, n: int, want: int, binary: bytes) -> np.ndarray:
    params = t.get("parameters") if isinstance(t.get("parameters"), dict) else {}
    size = params.get("binary_data_size")
    if "data" in t:
        raise _bad(f"input {name!r}: with binary data, the tensor has no 'data' in the JSON")
    itemsize = 1 if dtype == "UINT8" else 4
    if size != len(binary) or size != want * itemsize:
        raise _bad(f"input {name!r}: binary data is {len(binary)} bytes (binary_data_size {size!r}) but "
                   f"shape [{n},28,28] of {dtype} needs {want * itemsize}")
    if dtype == "UINT8":
        # As the JSON path scales (in float64), so both give the same inputs bit for bit.
        return (np.frombuffer(binary, np.uint8) / 255.0).astype(np.float32).reshape(n, 1, 28, 28)
    arr = np.frombuffer(binary, "<f4").astype(np.float32)
    if not np.isfinite(arr).all():
        raise _bad(f"input {name!r}: data holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        raise _bad(f"input {name!r}: FP32 values must be in [0, 1], got {lo:g} to {hi:g}")
    return arr.reshape(n, 1, 28, 28)


def _has_bool(data: list) -> bool:
    # JSON true/false parse as Python bools, which numpy would silently take as 1/0.
    return any(_has_bool(v) if isinstance(v, list) else isinstance(v, bool) for v in data)


def infer_response(model: str, version: int, result: dict, outputs: list[str], rid: str | None) -> dict:
    out = []
    for name in outputs:
        a = result[name]
        out.append({"name": name, "datatype": OUTPUTS[name], "shape": list(a.shape),
                    "data": a.ravel().tolist()})
    body = {"model_name": model, "model_version": str(version), "outputs": out}
    if rid is not None:
        body["id"] = rid
    return body


def model_metadata(model: str, version: int | None, max_batch: int, max_k: int) -> dict:
    return {
        "name": model,
        "versions": [str(version)] if version is not None else [],
        "model_version": str(version) if version is not None else None,
        "platform": "pytorch_torchexport+faiss",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28],
                    "parameters": {"also": "FP32 in [0,1]; shape [-1,1,28,28]", "max_batch": max_batch}}],
        "outputs": [{"name": n, "datatype": d, "shape": [-1] if n in ("label", "score") else [-1, -1]}
                    for n, d in OUTPUTS.items()],
        "parameters": {"k": {"default": DEFAULT_K, "min": 1, "max": max_k}},
    }
