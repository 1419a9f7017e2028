"""The errors a user can cause, and only those.

Every exception here derives from `UserError`. The command-line entry points (`vpr_jax.cli`)
print such an error as one line, `ErrorType: message`, and exit with status 1; the message names
the file, field or flag, the value found and what was expected. Any other exception is a bug and
keeps its traceback.
"""

from typing import Sequence


class UserError(Exception):
  """Base of the errors caused by the user's input, files or environment (not by a bug)."""


class ConfigError(UserError, ValueError):
  """A configuration field or command-line flag has a value that cannot be used."""


class DatasetError(UserError, ValueError):
  """The training data on disk does not have the expected layout or content."""


class DatasetNotFoundError(UserError, FileNotFoundError):
  """A benchmark (or the data root) is not where it was looked for."""


class MalformedDatasetError(UserError, ValueError):
  """A benchmark folder exists but its content is not usable (empty, bad names, bad lists)."""


class ArrayFileError(UserError, ValueError):
  """A `.npy` / `.npz` file from someone else cannot be read: missing, truncated or not an array."""


class UnsafeArrayFileError(ArrayFileError):
  """A `.npy` / `.npz` file's pickle holds more than plain data (code, objects): refused, not run."""


class InvalidRadiusError(ConfigError):
  """The positive radius (config data.positive_radius_m) is not a finite number >= 0."""


class BuiltDatasetError(UserError, ValueError):
  """A built TFDS folder is missing, incomplete, or was built for another configuration."""


class ImageDecodeError(UserError):
  """A file could not be decoded as an image.

  Attributes:
    path: the file that failed.
    reason: why, in words (the underlying decoder error included).
  """

  def __init__(self, path: str, reason: str):
    self.path = str(path)
    self.reason = str(reason)
    super().__init__(f'cannot decode image {self.path!r}: {self.reason}')

  def __reduce__(self):
    # Errors raised in data worker processes are pickled back to the parent.
    return (type(self), (self.path, self.reason))


class TooManyBadImagesError(UserError, RuntimeError):
  """More training images failed to decode than data.max_bad_image_fraction allows."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No checkpoint where one was asked for."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint does not match the configuration or the state it is restored into."""


class StateDictMismatchError(CheckpointMismatchError):
  """A PyTorch state dict does not match the model: lists every missing/unexpected/mis-shaped key.

  Attributes:
    missing: expected keys not in the state dict.
    unexpected: state-dict keys the model has no place for.
    mismatched: (key, expected torch shape, found shape) triples.
  """

  def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
               mismatched: Sequence[tuple[str, tuple, tuple]]):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f'{source} does not match the model '
             f'({len(self.missing)} missing, {len(self.unexpected)} unexpected, '
             f'{len(self.mismatched)} mis-shaped keys):']
    if self.missing:
      lines.append('  missing keys: ' + ', '.join(self.missing))
    if self.unexpected:
      lines.append('  unexpected keys: ' + ', '.join(self.unexpected))
    for key, expected, found in self.mismatched:
      lines.append(f'  mis-shaped key {key}: expected {tuple(expected)}, found {tuple(found)}')
    super().__init__('\n'.join(lines))


class TorchCheckpointError(UserError, ValueError):
  """A PyTorch checkpoint file cannot be read (not a torch file, truncated, unsafe content)."""


class UnsafeCheckpointError(TorchCheckpointError):
  """A PyTorch checkpoint's pickle would run code (os.system, eval, ...): refused, never run."""


class ExportFormatError(UserError, ValueError):
  """A model cannot be written in the PyTorch layout asked for (e.g. SALAD as a gsv-cities file)."""


class CheckpointWriteError(UserError, OSError):
  """A checkpoint could not be written (e.g. the disk is full); older checkpoints are intact."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient (config.on_nonfinite='stop')."""


class OutputPathError(UserError, OSError):
  """A result file cannot be written where the user asked."""


class WorkdirLockedError(UserError, OSError):
  """Another process holds the lock of a workdir (it is training) or of an index folder."""


class WorkdirNotUsableError(UserError, OSError):
  """The workdir is a file, or it (or a parent) cannot be created or written."""


class IndexNotFoundError(UserError, FileNotFoundError):
  """There is no localisation index where one was looked for."""


class IndexMismatchError(UserError, ValueError):
  """An index was built with another model, weights or preprocessing than the one given."""


class DamagedIndexError(IndexMismatchError):
  """A file of an index folder is missing, truncated, unreadable or does not fit its manifest."""


class ImageFolderError(UserError, ValueError):
  """The folder to index is missing, not a folder, or holds no image."""


class CoordinatesFileError(UserError, ValueError):
  """The coordinates CSV is missing or malformed."""


class HlocFormatError(UserError, ValueError):
  """Something cannot be written in hloc's retrieval files (e.g. an image name with a space)."""


class FaissIndexError(UserError, ValueError):
  """The FAISS index asked for cannot be built (bad factory string, too few images to train)."""
