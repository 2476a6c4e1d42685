"""Reading a compiled program's optimised HLO text (``jax.stages.Compiled.as_text()``).

Used by the update benchmark (the update's matrix products) and the update profile (which kind
of op each traced instruction is). Written with regular expressions because JAX exposes no stable
Python API over a compiled module's instructions; only the text is stable enough to read.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(([^)]*)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Instruction:
    """What the benchmarks need of one compiled HLO instruction."""

    shape: str
    """Result shape as printed, e.g. ``f32[256,256]{1,0}``."""
    opcode: str
    op_name: str
    """The op-name metadata: the JAX call path that produced the instruction."""
    library_fusion: bool
    """Whether the instruction is an XNNPACK / YNNPACK fusion."""
    operands: tuple[str, ...]
    """Names of the instructions it reads."""
    dimension_numbers: DimensionNumbers | None
    """``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))`` of a ``dot``, else None."""


@dataclasses.dataclass(frozen=True)
class Product:
    """One matrix product of a compiled program: its operands' shapes and dimension numbers."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    dimension_numbers: DimensionNumbers

    @property
    def flops(self) -> int:
        """Multiply-adds times two: every lhs element meets every free rhs column once."""
        (_, rhs_contracting), (_, rhs_batch) = self.dimension_numbers
        rhs_free = [size for axis, size in enumerate(self.rhs_shape) if axis not in rhs_contracting + rhs_batch]
        return 2 * math.prod(self.lhs_shape) * math.prod(rhs_free)


def _attribute_dims(line: str, attribute: str) -> tuple[int, ...]:
    match = re.search(attribute + r"=\{([\d,]*)\}", line)
    return tuple(int(d) for d in match.group(1).split(",") if d) if match else ()


def _dot_dimension_numbers(line: str) -> DimensionNumbers:
    contracting = (_attribute_dims(line, "lhs_contracting_dims"), _attribute_dims(line, "rhs_contracting_dims"))
    batch = (_attribute_dims(line, "lhs_batch_dims"), _attribute_dims(line, "rhs_batch_dims"))
    return contracting, batch


def parse_hlo(text: str) -> dict[str, Instruction]:
    """Instruction name -> ``Instruction``, in program order, from ``Compiled.as_text()``
    (instruction names are unique within a module)."""
    instructions = {}
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, shape, opcode, operands = match.groups()
            op_name = _OP_NAME.search(line)
            instructions[name] = Instruction(
                shape=shape,
                opcode=opcode,
                op_name=op_name.group(1) if op_name else "",
                library_fusion="__ynn_fusion" in line or "__xnn_fusion" in line,
                operands=tuple(operand.strip().lstrip("%") for operand in operands.split(",") if operand.strip()),
                dimension_numbers=_dot_dimension_numbers(line) if opcode == "dot" else None,
            )
    return instructions


def array_dims(shape: str) -> tuple[int, ...]:
    """Dimensions of an array shape as HLO prints it: ``f32[23,512]{1,0}`` -> ``(23, 512)``."""
    return tuple(int(d) for d in shape[shape.index("[") + 1:shape.index("]")].split(",") if d)


def compiled_products(compiled: jax.stages.Compiled) -> list[Product]:
    """Every ``dot`` of a compiled program, in program order (products XLA removed as dead are not
    in the optimised program)."""
    instructions = parse_hlo(compiled.as_text())
    products = []
    for instruction in instructions.values():
        if instruction.opcode == "dot":
            lhs, rhs = instruction.operands
            shapes = array_dims(instructions[lhs].shape), array_dims(instructions[rhs].shape)
            products.append(Product(*shapes, instruction.dimension_numbers))
    return products
