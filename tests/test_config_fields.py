"""Tests of vpr_jax.config_fields: comma-separated values for tuple fields on the command line."""

import pathlib

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from configs import default
from vpr_jax import config_fields

DEFAULT_CONFIG_FILE = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py')


def _flag_config(arguments):
  """The config that config_flags makes of a command line (`train --config.x=...`)."""
  argv = ['train'] + list(arguments)
  flag_values = flags.FlagValues()
  # The override flags are defined from the command line itself, as for a real program.
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG_FILE, flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _parse(*arguments):
  """The config a real command line gives: config_flags parsing, then the split."""
  config = _flag_config(arguments)
  changed = config_fields.split_comma_separated(config)
  return config, changed


def test_config_flags_alone_keep_one_element():
  # What the split is for: config_flags makes one city of the comma-separated text.
  assert _flag_config(['--config.data.cities=Bangkok,Barcelona']).data.cities == (
      'Bangkok,Barcelona',)


def test_comma_separated_cities_and_benchmarks():
  config, changed = _parse('--config.data.cities=Bangkok,Barcelona',
                           '--config.data.val_datasets=sf_xs_val,tokyo_xs')
  assert config.data.cities == ('Bangkok', 'Barcelona')
  assert config.data.val_datasets == ('sf_xs_val', 'tokyo_xs')
  assert sorted(changed) == ['data.cities', 'data.val_datasets']


def test_other_spellings_are_unchanged_or_equivalent():
  config, changed = _parse('--config.data.cities=Bangkok')
  assert config.data.cities == ('Bangkok',) and changed == []
  config, _ = _parse("--config.data.cities=('Bangkok', 'Barcelona')")
  assert config.data.cities == ('Bangkok', 'Barcelona')
  config, _ = _parse('--config.data.cities=Bangkok', '--config.data.cities=Barcelona,Lisbon')
  assert config.data.cities == ('Bangkok', 'Barcelona', 'Lisbon')
  config, _ = _parse('--config.data.cities=Bangkok,')
  assert config.data.cities == ('Bangkok',)
  # Numbers are parsed by config_flags already and are left alone.
  config, changed = _parse('--config.image_size=32,48')
  assert config.image_size == (32, 48) and changed == []
  # Without any flag nothing changes.
  config, changed = _parse()
  assert config.data.cities == default.get_config().data.cities and changed == []


def test_string_field_of_a_tuple_default():
  # A config file that writes the cities as one string: the defaults tell it is a tuple field.
  config = ml_collections.ConfigDict({'data': {'cities': 'Bangkok, Barcelona',
                                               'train_dir': 'gsv,cities'}})
  changed = config_fields.split_comma_separated(config, default.get_config())
  assert changed == ['data.cities']
  assert config.data.cities == ('Bangkok', 'Barcelona')
  assert config.data.train_dir == 'gsv,cities'  # Not a tuple field: a string stays a string.


def test_locked_config():
  config = default.get_config()
  config.data.cities = ('Bangkok,Osaka',)
  config.lock()
  assert config_fields.split_comma_separated(config) == ['data.cities']
  assert config.data.cities == ('Bangkok', 'Osaka')
  with pytest.raises(AttributeError):
    config.data.new_field = 1  # Still locked.
