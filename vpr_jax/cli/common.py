"""What every entry point shares: config names, dashed flags, and user errors as one line.

A missing dataset, a malformed CSV, a checkpoint of another model or a full disk are not bugs:
the command prints `ErrorType: message` (the message names the file and what was expected) and
exits with status 1. Any other exception keeps its traceback.
"""

import difflib
import functools
import importlib.resources
import os
import runpy
import signal
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags

from vpr_jax import errors

CONFIG_FLAG = 'config'


def packaged_config_names() -> list[str]:
  """Names of the configs shipped with the package (`configs/*.py` minus helpers)."""
  folder = importlib.resources.files('vpr_jax.configs')
  return sorted(entry.name[:-3] for entry in folder.iterdir()
                if entry.name.endswith('.py') and not entry.name.startswith('_'))


def resolve_config_path(value: str) -> str:
  """A `--config` value -> a config file path.

  Args:
    value: a path to a `.py` file (as before), or the name of a packaged config (`mixvpr`,
      `demo`, ...), optionally with `.py`.

  Returns:
    The path of the file.

  Raises:
    ConfigError: neither an existing file nor a packaged config name (the names are listed).
  """
  if os.path.isfile(os.path.expanduser(value)):
    return os.path.expanduser(value)
  name = value[:-3] if value.endswith('.py') else value
  names = packaged_config_names()
  if name in names:
    return str(importlib.resources.files('vpr_jax.configs') / f'{name}.py')
  if os.sep in value or value.endswith('.py'):
    raise errors.ConfigError(f'--config {value!r}: no such file (packaged configs: '
                             f'{", ".join(names)}).')
  close = difflib.get_close_matches(name, names, n=3)
  raise errors.ConfigError(
      f'--config {value!r} is neither a file nor a packaged config'
      f'{" (did you mean " + " or ".join(close) + "?)" if close else ""}; packaged configs: '
      f'{", ".join(names)}.')


def rewrite_argv(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Accepts the spellings users type: dashed flag names and packaged config names.

  `--save-descriptors=x` becomes `--save_descriptors=x` for the flags defined in `flag_values`
  (absl names cannot contain '-'; only the name part of a known flag is changed, also in its
  `--no` boolean form), and `--config mixvpr` becomes `--config <path of the packaged file>`.

  Args:
    argv: command line, program name first.
    flag_values: the registry the names are checked against.

  Returns:
    The rewritten command line.
  """
  known = set(flag_values)
  rewritten = list(argv[:1])
  tokens = list(argv[1:])
  position = 0
  while position < len(tokens):
    token = tokens[position]
    position += 1
    if token == '--':
      rewritten.append(token)
      rewritten.extend(tokens[position:])
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
    if CONFIG_FLAG in known and token in ('--' + CONFIG_FLAG, '-' + CONFIG_FLAG):
      if position < len(tokens):
        rewritten.extend([token, resolve_config_path(tokens[position])])
        position += 1
        continue
    elif CONFIG_FLAG in known and token.startswith('--' + CONFIG_FLAG + '='):
      token = '--' + CONFIG_FLAG + '=' + resolve_config_path(token.split('=', 1)[1])
    rewritten.append(token)
  return rewritten


def _override_fields(argv: Sequence[str]) -> list[str]:
  """The dotted field names of the `--config.a.b=value` / `--config.a.b value` overrides."""
  prefix = '--' + CONFIG_FLAG + '.'
  fields = []
  for token in argv[1:]:
    if token == '--':
      break
    if token.startswith(prefix):
      fields.append(token[len(prefix):].split('=', 1)[0])
  return fields


def check_config_overrides(argv: Sequence[str]) -> None:
  """Refuses, in one line, a `--config.x.y` override of a field that the config does not have.

  Args:
    argv: the command line after `rewrite_argv` (so `--config` holds a file path).

  Raises:
    ConfigError: naming the unknown field and the close matches among the config's fields.
  """
  fields = _override_fields(argv)
  path = None
  for position, token in enumerate(argv):
    if token in ('--' + CONFIG_FLAG, '-' + CONFIG_FLAG) and position + 1 < len(argv):
      path = argv[position + 1]
    elif token.startswith('--' + CONFIG_FLAG + '='):
      path = token.split('=', 1)[1]
  if not fields or path is None or not os.path.isfile(path):
    return  # absl reports a missing config itself
  config = runpy.run_path(path)['get_config']()
  for field in fields:
    config_field(config, field, f'--config.{field}')


def config_field(config, field: str, label: str) -> tuple[Any, str]:
  """(the node holding it, its last name) of a dotted config field such as 'optim.lr'.

  Raises:
    ConfigError: '<label>: <node> has no field <name> (did you mean ...)' when a part is absent.
  """
  node, walked = config, []
  parts = field.split('.')
  for position, part in enumerate(parts):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = '.'.join(walked) or 'the config'
      close = difflib.get_close_matches(part, keys, n=3)
      raise errors.ConfigError(
          f'{label}: {where} has no field {part!r}'
          f'{" (did you mean " + " or ".join(close) + "?)" if close else ""}; its fields: '
          f'{", ".join(sorted(keys))}.')
    if position == len(parts) - 1:
      return node, part
    node = node[part]
    walked.append(part)


def report_user_errors(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """Calls fn; a `errors.UserError` becomes `SystemExit('<ErrorType>: <message>')` (exit 1).

  Args:
    fn: the library call of an entry point.
    *args: its positional arguments.
    **kwargs: its keyword arguments.

  Returns:
    What fn returns.
  """
  try:
    return fn(*args, **kwargs)
  except errors.UserError as e:
    raise SystemExit(f'{type(e).__name__}: {e}') from None


class Interrupted(KeyboardInterrupt):
  """Raised in the main thread by SIGTERM where `run` turns it into an exception (as Ctrl-C is).

  A KeyboardInterrupt, so that `except Exception` clean-up code does not swallow it while the
  `finally` blocks (temporary files removed, worker processes stopped) still run.
  """

  def __init__(self, signal_number: int):
    super().__init__(signal_number)
    self.signal_number = signal_number


def _raise_interrupted(signal_number: int, frame: Any) -> None:
  del frame  # Unused.
  raise Interrupted(signal_number)


def interrupted_line(signal_number: int, outcome: str) -> str:
  """The line a command prints when a signal stops it: 'Stopped by SIGINT: <outcome>'."""
  return f'Stopped by {signal.Signals(signal_number).name}: {outcome}'


def _exit_now(status: int, signal_number: int, frame: Any) -> None:
  del signal_number, frame  # Unused.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def exit_with_status_after_a_signal(status: int):
  """Exits with `status` (128 + the first signal's number); another signal now exits at once.

  The command has stopped cleanly and said so. A second Ctrl-C or SIGTERM arriving while the
  interpreter shuts down would otherwise raise KeyboardInterrupt outside any handler, and Python
  then ends itself by SIGINT (status -2) instead of the status the command chose; nothing is left
  to save or clean up by then.
  """
  for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, functools.partial(_exit_now, status))
  raise SystemExit(status)


def _main_stopping_on_signals(main: Callable[[list[str]], Any], outcome: str,
                              argv: list[str]) -> Any:
  """Runs `main`; Ctrl-C (and SIGTERM, once `run` made it an exception) ends with one line."""
  try:
    return main(argv)
  except KeyboardInterrupt as e:
    number = e.signal_number if isinstance(e, Interrupted) else int(signal.SIGINT)
    print(interrupted_line(number, outcome), file=sys.stderr, flush=True)
    # The shell's convention for a job ended by a signal: 128 + its number (130, 143).
    exit_with_status_after_a_signal(128 + number)


def run(main: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None,
        interrupted: str = 'stopped before the end; no file was left half-written.',
        sigterm_as_interrupt: bool = False) -> None:
  """Runs `main` under absl after `rewrite_argv`; errors in the command line are one line too.

  Args:
    main: the command's main(argv).
    argv: the command line (default sys.argv).
    interrupted: what a Ctrl-C leaves behind, printed after 'Stopped by SIGINT: ' instead of a
      KeyboardInterrupt traceback (exit status 130).
    sigterm_as_interrupt: SIGTERM ends the command as Ctrl-C does (the same line, status 143,
      the `finally` clean-up run), instead of killing it at once. For commands whose work is
      resumable and that have no stop handling of their own (training has: it saves first).
  """
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = rewrite_argv(argv)
    check_config_overrides(argv)
  except errors.UserError as e:
    raise SystemExit(f'{type(e).__name__}: {e}') from None
  if sigterm_as_interrupt and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _raise_interrupted)
  app.run(functools.partial(_main_stopping_on_signals, main, interrupted), argv=argv)
