"""What the command-line entry points share: errors about the user's input, shown without traceback.

A missing dataset, a malformed CSV, a checkpoint of another model or a full disk are not bugs:
the command prints `ErrorType: message` (the message names the file and what was expected) and
exits with status 1. Any other exception keeps its traceback.
"""

from typing import Any, Callable

from vpr_jax import checkpointing
from vpr_jax import training
from vpr_jax.conversion import torch_reader
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
    torch_reader.TorchCheckpointError,
    torch_reader.CheckpointNotFoundError,
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
