"""Strict JSON: non-finite numbers become null, numpy and JAX values plain JSON."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from vpr_jax import strict_json


def _strict_loads(text):
  """json.loads that fails on NaN / Infinity, as strict readers do."""
  def refuse(word):
    raise ValueError(f'non-standard JSON constant {word}')
  return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -math.inf, np.float32('nan'),
                                   np.float64('-inf'), np.float16('inf'), jnp.float32(jnp.nan)])
def test_non_finite_scalars_become_null(value):
  assert strict_json.json_safe(value) is None
  assert strict_json.dumps(value) == 'null'


def test_nested_record_with_numpy_values():
  record = {
      'step': np.int64(7),
      'loss': np.float32(0.25),
      'grad_norm': np.float32('nan'),
      'ok': np.bool_(True),
      'recall': {1: np.float64(50.0), 5: float('inf')},
      'history': (1.0, float('-inf'), [np.float32('nan'), 2]),
      'descriptor': np.array([[1.0, np.nan], [np.inf, 3.0]], np.float32),
      'device_value': jnp.array([0.5, jnp.inf]),
      'name': 'run',
      'missing': None,
  }
  text = strict_json.dumps(record, sort_keys=True)
  decoded = _strict_loads(text)
  assert decoded == {
      'step': 7, 'loss': 0.25, 'grad_norm': None, 'ok': True,
      'recall': {'1': 50.0, '5': None},
      'history': [1.0, None, [None, 2]],
      'descriptor': [[1.0, None], [None, 3.0]],
      'device_value': [0.5, None],
      'name': 'run', 'missing': None,
  }
  assert type(strict_json.json_safe(np.int64(7))) is int
  assert type(strict_json.json_safe(np.float32(0.25))) is float
  assert type(strict_json.json_safe(np.bool_(False))) is bool


def test_input_is_not_modified_and_plain_json_would_not_be_strict():
  record = {'loss': float('nan'), 'values': [float('inf')]}
  assert strict_json.json_safe(record) == {'loss': None, 'values': [None]}
  assert math.isnan(record['loss']) and record['values'] == [float('inf')]
  # What json.dumps alone writes: the reason for this module.
  with pytest.raises(ValueError, match='NaN'):
    _strict_loads(json.dumps(record))


def test_unknown_objects_are_refused_by_dumps():
  with pytest.raises(TypeError):
    strict_json.dumps({'when': object()})
