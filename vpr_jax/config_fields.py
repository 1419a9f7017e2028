"""Command-line conveniences for config fields: comma-separated values of tuple fields.

`ml_collections.config_flags` parses `--config.data.cities=Bangkok,Barcelona` with
`ast.literal_eval`; that fails on bare words, so the whole text becomes a one-element tuple,
`('Bangkok,Barcelona',)`, and training would look for one city named 'Bangkok,Barcelona'. Only
the tuple literal `--config.data.cities="('Bangkok', 'Barcelona')"` or a repeated flag
(`--config.data.cities=Bangkok --config.data.cities=Barcelona`) worked. `split_comma_separated`
turns the comma-separated form into the tuple the user meant. Numbers need nothing:
`--config.image_size=32,32` already gives (32, 32).

No city, benchmark or path in this project's configs holds a comma, so a comma in a string
element of a tuple field always separates two elements.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _split_items(items: tuple | list | str) -> tuple:
  """('a,b', 'c') -> ('a', 'b', 'c'); elements without a comma (and non-strings) are kept as is."""
  if isinstance(items, str):
    items = (items,)
  result = []
  for item in items:
    if isinstance(item, str) and ',' in item:
      # 'Bangkok, Barcelona' and 'Bangkok,' mean ('Bangkok', 'Barcelona') and ('Bangkok',).
      result.extend(part.strip() for part in item.split(',') if part.strip())
    else:
      result.append(item)
  return tuple(result)


def _lookup(defaults: Any, key: str) -> Any:
  if defaults is None:
    return None
  try:
    return defaults[key]
  except (KeyError, TypeError, AttributeError):
    return None


def split_comma_separated(config: ml_collections.ConfigDict,
                          defaults: ml_collections.ConfigDict | None = None,
                          prefix: str = '') -> list[str]:
  """Splits comma-separated strings given for tuple fields, in place.

  A field is a tuple field when its value is a tuple (config_flags keeps the type of the
  default) or, when `defaults` is given, when its default there is a tuple (for a field that holds
  a plain string). Each string element with a comma is split on the commas and stripped of
  spaces; empty parts are dropped. Other fields and elements are left alone.

  Args:
    config: the parsed config (e.g. the value of a `config_flags.DEFINE_config_file` flag);
      changed in place.
    defaults: optionally, the config as its file builds it (e.g. `configs/default.get_config()`),
      to recognise tuple fields that hold a plain string.
    prefix: the dotted path of `config` inside the whole config (for the returned names).

  Returns:
    The dotted names of the fields that were changed, e.g. ['data.cities'].
  """
  changed = []
  for key, value in list(config.items()):
    path = f'{prefix}{key}'
    default = _lookup(defaults, key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      changed += split_comma_separated(value, default, prefix=f'{path}.')
      continue
    tuple_field = isinstance(value, tuple) or (isinstance(value, str) and
                                               isinstance(default, tuple))
    if not tuple_field:
      continue
    split = _split_items(value)
    if split != value:
      if isinstance(config, ml_collections.ConfigDict):
        # A field that a config file created as a string is retyped to the tuple it stands for.
        with config.ignore_type():
          config[key] = split
      else:
        config[key] = split
      changed.append(path)
  return changed
