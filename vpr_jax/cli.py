"""What the command-line entry points share: errors about the user's input, shown without traceback.

A missing dataset, a malformed CSV, a checkpoint of another model or a full disk are not bugs:
the command prints `ErrorType: message` (the message names the file and what was expected) and
exits with status 1. Any other exception keeps its traceback.
"""

from typing import Any, Callable

from absl import flags

from vpr_jax import checkpointing
from vpr_jax import fileio
from vpr_jax import localization
from vpr_jax import training
from vpr_jax.data import benchmarks
from vpr_jax.data import gsv_cities
from vpr_jax.data import images
from vpr_jax.data import prepared
from vpr_jax.data import train_pipeline

USER_ERRORS = (
    benchmarks.DatasetNotFoundError,
    benchmarks.MalformedDatasetError,
    gsv_cities.DatasetError,
    prepared.PreparedDataError,
    images.ImageDecodeError,
    train_pipeline.TooManyBadImagesError,
    checkpointing.CheckpointMismatchError,
    checkpointing.CheckpointWriteError,
    training.NonFiniteError,
    localization.IndexNotFoundError,
    localization.IndexMismatchError,
    localization.ImageFolderError,
    localization.CoordinatesFileError,
    localization.FaissIndexError,
    localization.CheckpointNotFoundError,
    fileio.OutputPathError,
)


def report_user_errors(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """Calls fn; a USER_ERRORS exception becomes `SystemExit('<ErrorType>: <message>')`.

  Args:
    fn: the library call of an entry point.
    *args: its positional arguments.
    **kwargs: its keyword arguments.

  Returns:
    What fn returns.
  """
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    raise SystemExit(f'{type(e).__name__}: {e}') from None


def normalize_dashed_flags(argv, flag_values=flags.FLAGS):
  """Rewrites `--save-descriptors=x` to `--save_descriptors=x` for the flags of `flag_values`.

  absl flag names cannot contain '-'. Only the name part of tokens that name a known flag
  (also in its `--no` boolean form) is changed; values and unknown flags are left alone.

  Args:
    argv: command line, program name first.
    flag_values: the registry the names are checked against.

  Returns:
    The rewritten command line.
  """
  known = set(flag_values)
  rewritten = list(argv[:1])
  for position, token in enumerate(argv[1:], start=1):
    if token == '--':
      rewritten.extend(argv[position:])
      break
    if token.startswith('--') and '-' in token[2:].split('=', 1)[0]:
      name, sep, value = token[2:].partition('=')
      candidate = name.replace('-', '_')
      if candidate in known:
        token = '--' + candidate + sep + value
      elif not sep:
        # Boolean negations: --no-only-failures / --noonly-failures -> --noonly_failures.
        for prefix in ('no_', 'no'):
          if candidate.startswith(prefix) and candidate[len(prefix):] in known:
            token = '--no' + candidate[len(prefix):]
            break
    rewritten.append(token)
  return rewritten
