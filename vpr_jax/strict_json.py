"""Strict JSON for records that hold measured numbers (metrics.jsonl, result files).

Python's `json.dumps` writes NaN and Infinity as the bare words `NaN` / `Infinity`, which are not
JSON: strict readers (jq, JavaScript, pandas with some engines) reject the whole line. A loss that
diverged or a recall over an empty set is still worth recording, so non-finite numbers become
`null`; numpy and JAX scalars and arrays, which `json` does not know, become plain numbers and
lists.
"""

import json
import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
  """A copy of `value` that strict JSON can encode: non-finite floats become None.

  Nested dicts, lists and tuples are converted throughout; numpy scalars become Python numbers
  (np.float32(nan) -> None, np.int64(3) -> 3, np.bool_ -> bool); arrays (numpy, or anything
  with `__array__`, e.g. a JAX array) become (nested) lists, or a number when 0-dimensional.
  Dict keys that are numpy scalars become Python scalars (json turns int keys into strings).

  Args:
    value: a number, string, None, array, or container of these.

  Returns:
    The converted value (the input is not modified).
  """
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, (float, np.floating)):
    number = float(value)
    return number if math.isfinite(number) else None
  if isinstance(value, np.bool_):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, dict):
    return {_key(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray) or hasattr(value, '__array__'):
    # tolist() gives Python scalars (a scalar for 0-d), which the branches above then check.
    return json_safe(np.asarray(value).tolist())
  return value


def _key(key: Any) -> Any:
  if isinstance(key, np.generic):
    return key.item()
  return key


def dumps(value: Any, **kwargs) -> str:
  """`json.dumps(json_safe(value))`, refusing any non-finite number that slipped through.

  Args:
    value: what to encode.
    **kwargs: passed to json.dumps (e.g. indent, sort_keys).

  Returns:
    The JSON text.
  """
  return json.dumps(json_safe(value), allow_nan=False, **kwargs)
