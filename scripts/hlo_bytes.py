"""Memory traffic of an optimised XLA program, read from its HLO text (scripts/aot_compile.py).

Every top-level instruction of the entry computation (and of the bodies it calls: while, call,
conditional) is one kernel or library call; its traffic is the bytes of its operands plus its
result, as XLA's GPU cost model counts a fusion. cuDNN and cuBLAS custom calls are counted the
same way (XLA's generic cost analysis counts them as -1); their scratch workspace (the 1-D u8 / s8
last element of their result tuple) is left out. No reuse through L2 / VMEM between kernels is
assumed, so this is an estimate of HBM traffic, not a measurement.

Kinds: 'convolution' (cuDNN calls, or fusions holding a convolution), 'matmul' (cuBLAS calls, or
fusions holding a dot), 'fusion' (other fusions), 'other' (unfused copies, transposes, sorts,
...). Collectives are listed apart (kind, count, bytes of the result) and not added to the HBM
total. Parts come from the op_name metadata that jax writes (Flax module paths, and the named
scopes of training/step.py): 'stem', 'layer1'..'layer4', 'blocks' (ViT), 'backbone (other)',
'aggregator', 'input' (normalisation), 'loss', 'optimizer', 'augment', 'other'; 'backward' when
the op comes from the transpose (autodiff) of the forward.
"""

import dataclasses
import re

KINDS = ('fusion', 'convolution', 'matmul', 'other')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3': 1, 'f8e5m2fnuz': 1, 'f8e4m3fnuz': 1,
                's4': 0.5, 'u4': 0.5, 'token': 0}
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
         'partition-id', 'replica-id', 'opt-barrier', 'add-dependency', 'domain', 'copy-done',
         'all-reduce-done', 'all-gather-done', 'collective-permute-done', 'async-done',
         'async-update', 'send-done', 'recv-done'}
_CONTROL = {'while', 'call', 'conditional'}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'collective-broadcast', 'ragged-all-to-all')
_SHAPE = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%(\S+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$')
_CALLS = re.compile(r'(?:calls|body|condition|to_apply|true_computation|false_computation)='
                    r'%([\w.\-]+)|branch_computations=\{([^}]*)\}')


def shape_bytes(shape: str, skip_u8_in_tuple: bool = False) -> float:
  """Bytes of an HLO shape string (arrays and tuples; layouts ignored)."""
  parts = _SHAPE.findall(shape)
  if skip_u8_in_tuple and shape.startswith('(') and len(parts) > 1:
    # The scratch workspace of cuDNN / cuBLAS calls: a 1-D u8 (or s8) last element.
    if parts[-1][0] in ('u8', 's8') and ',' not in parts[-1][1]:
      parts = parts[:-1]
  total = 0.0
  for dtype, dims in parts:
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    total += count * _DTYPE_BYTES.get(dtype, 4)
  return total


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list
  attributes: str


def _split_shape(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)...' or 'f32[2]{0} op(...)' -> (shape, remainder)."""
  if rest.startswith('('):
    depth = 0
    for i, char in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, remainder = rest.partition(' ')
  return shape, remainder


def _parse_instruction(line: str):
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  shape, rest = _split_shape(rest)
  opcode, _, rest = rest.partition('(')
  depth, end = 1, len(rest)
  for i, char in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      end = i
      break
  operands = re.findall(r'%([\w.\-]+)', rest[:end])
  return Instruction(name, shape, opcode.strip(), operands, rest[end + 1:])


def parse_module(text: str) -> tuple[dict, str]:
  """{computation name: [Instruction]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(2)
        computations[current] = []
        if match.group(1):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    instruction = _parse_instruction(line)
    if instruction is not None:
      computations[current].append(instruction)
  return computations, entry


def model_part(op_name: str) -> str:
  """The model part an op belongs to, from its op_name metadata."""
  for scope in ('augment', 'loss', 'optimizer'):
    # A named scope shows as '/loss/' or, inside autodiff, as 'jvp(loss)'.
    if re.search(rf'[/(]{scope}[/)]', op_name + '/'):
      return scope
  if '/aggregator' in op_name:
    return 'aggregator'
  match = re.search(r'/backbone/([\w]+)', op_name)
  if match:
    module = match.group(1)
    if module in ('conv1', 'bn1'):
      return 'stem'
    if module.startswith('layer'):
      return module
    if module.startswith('blocks'):
      return 'blocks'
    return 'backbone (other)'
  if 'VPRModel' in op_name:
    return 'input'
  return 'other'


def _kind(instruction: Instruction, computations: dict) -> str:
  if instruction.opcode == 'custom-call':
    target = re.search(r'custom_call_target="([^"]*)"', instruction.attributes)
    target = target.group(1) if target else ''
    if 'conv' in target.lower():
      return 'convolution'
    if 'cublas' in target or 'gemm' in target.lower() or 'matmul' in target.lower():
      return 'matmul'
    return 'other'
  if instruction.opcode == 'convolution':
    return 'convolution'
  if instruction.opcode == 'dot':
    return 'matmul'
  if instruction.opcode == 'fusion':
    called = _CALLS.search(instruction.attributes)
    body = computations.get(called.group(1), []) if called and called.group(1) else []
    opcodes = {i.opcode for i in _flatten(body, computations)}
    if 'convolution' in opcodes:
      return 'convolution'
    if 'dot' in opcodes:
      return 'matmul'
    return 'fusion'
  return 'other'


def _flatten(instructions, computations, depth=0):
  """Instructions of a fused computation, with those of nested fusions."""
  for instruction in instructions:
    yield instruction
    if instruction.opcode == 'fusion' and depth < 4:
      called = _CALLS.search(instruction.attributes)
      if called and called.group(1):
        yield from _flatten(computations.get(called.group(1), []), computations, depth + 1)


@dataclasses.dataclass
class Traffic:
  """HBM bytes of one program (see the module docstring)."""
  total_bytes: float = 0.0
  by_kind: dict = dataclasses.field(default_factory=dict)
  by_part: dict = dataclasses.field(default_factory=dict)
  collectives: dict = dataclasses.field(default_factory=dict)
  kernels: int = 0
  largest: list = dataclasses.field(default_factory=list)


def _collective_kind(opcode: str):
  for kind in _COLLECTIVES:
    if opcode in (kind, f'{kind}-start'):
      return kind
  return None


def _op_name(instruction: Instruction, computations: dict) -> str:
  """The op_name metadata of an instruction; for a fusion without one, its body's most common."""
  found = re.search(r'op_name="([^"]*)"', instruction.attributes)
  if found or instruction.opcode != 'fusion':
    return found.group(1) if found else ''
  called = _CALLS.search(instruction.attributes)
  body = computations.get(called.group(1), []) if called and called.group(1) else []
  counts = {}
  for inner in _flatten(body, computations):
    inner_name = re.search(r'op_name="([^"]*)"', inner.attributes)
    if inner_name:
      counts[inner_name.group(1)] = counts.get(inner_name.group(1), 0) + 1
  return max(counts, key=counts.get) if counts else ''


def _add(traffic: Traffic, instruction: Instruction, shapes: dict, computations: dict) -> None:
  """Adds one top-level instruction's traffic (or collective) to `traffic`."""
  op_name = _op_name(instruction, computations)
  collective = _collective_kind(instruction.opcode)
  if collective is not None:
    entry = traffic.collectives.setdefault(collective, {'count': 0, 'bytes': 0.0, 'sizes': []})
    size = shape_bytes(instruction.shape)
    if instruction.opcode.endswith('-start') and instruction.shape.startswith('('):
      size /= 2  # (operand, result) pairs of the async form.
    entry['count'] += 1
    entry['bytes'] += size
    entry['sizes'].append(int(size))
    return
  is_custom = instruction.opcode == 'custom-call'
  size = shape_bytes(instruction.shape, skip_u8_in_tuple=is_custom)
  # Each distinct operand is read once (an operand listed twice is one buffer).
  size += sum(shapes.get(name, 0.0) for name in dict.fromkeys(instruction.operands))
  kind = _kind(instruction, computations)
  part = model_part(op_name)
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  traffic.total_bytes += size
  traffic.kernels += 1
  traffic.by_kind[kind] = traffic.by_kind.get(kind, 0.0) + size
  entry = traffic.by_part.setdefault(part, {'forward': 0.0, 'backward': 0.0, 'total': 0.0})
  entry[direction] += size
  entry['total'] += size
  traffic.largest.append((size, kind, instruction.shape[:80], op_name[-120:]))


def instruction_table(text: str) -> dict:
  """{instruction name: (kind, part, 'forward' | 'backward')} of every instruction of a
  compiled module (profilers name the kernels they time by these names)."""
  computations, _ = parse_module(text)
  table = {}
  for body in computations.values():
    for instruction in body:
      op_name = _op_name(instruction, computations)
      direction = 'backward' if 'transpose(' in op_name else 'forward'
      table[instruction.name] = (_kind(instruction, computations), model_part(op_name), direction)
  return table


def analyse_hlo(text: str, top: int = 200) -> Traffic:
  """HBM traffic of an optimised HLO module's text (`compiled.as_text()`)."""
  computations, entry = parse_module(text)
  traffic = Traffic()
  pending, seen = [entry], set()
  while pending:
    name = pending.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    body = computations[name]
    shapes = {i.name: shape_bytes(i.shape) for i in body}
    for instruction in body:
      if instruction.opcode in _CONTROL:
        for called in _CALLS.finditer(instruction.attributes):
          if called.group(1):
            pending.append(called.group(1))
          else:
            pending.extend(n.strip().lstrip('%') for n in called.group(2).split(','))
        continue
      if instruction.opcode in _FREE:
        continue
      _add(traffic, instruction, shapes, computations)
  traffic.largest = sorted(traffic.largest, reverse=True)[:top]
  return traffic
