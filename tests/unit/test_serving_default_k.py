"""A request that names no k gets the k the pipeline evaluated with, or the whole gallery
when that is smaller; an explicit k is checked as given."""
import json

import numpy as np
import pytest

from serving.protocol import DEFAULT_K, ProtocolError, default_k, parse_infer
from steps import evaluate


def body(**extra) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 28, 28], "datatype": "UINT8",
                                   "data": [0] * 784}], **extra}).encode()


def test_the_served_default_is_the_evaluated_one():
    assert DEFAULT_K == evaluate.DEFAULT_K
    assert default_k(60_000) == evaluate.DEFAULT_K
    assert default_k(7) == 7 and default_k(0) == 1


def test_k_absent_is_none_and_an_explicit_k_is_checked():
    x, k, _, _ = parse_infer(body(), max_batch=8, max_k=100)
    assert k is None and x.shape == (1, 1, 28, 28) and np.all(x == 0)
    assert parse_infer(body(parameters={}), max_batch=8, max_k=100)[1] is None
    assert parse_infer(body(parameters={"k": 3}), max_batch=8, max_k=100)[1] == 3
    with pytest.raises(ProtocolError, match="parameter k must be an integer from 1 to 100"):
        parse_infer(body(parameters={"k": 101}), max_batch=8, max_k=100)
