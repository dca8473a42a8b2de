"""The dynamic symbols and relocation slots of an ELF shared library, read from its file.

:mod:`kvpool.blas` uses this to tell truthfully which library MLX calls for ``cblas_sgemm``:
it finds the slot (GOT entry) that ``libmlx.so`` calls through, then reads the address the
dynamic linker stored there. Only what that needs is read: 64-bit little-endian ELF (every
Linux platform MLX ships wheels for), the ``SHT_DYNSYM`` table and the ``SHT_RELA`` sections.
No dependency beyond the standard library; nothing is loaded or executed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["DynamicSymbols", "read_dynamic_symbols", "relocation_offsets"]

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_SHT_RELA = 4
_SHT_DYNSYM = 11
_SHN_UNDEF = 0

# Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
# Elf64_Sym: name, info, other, shndx, value, size.
_SYMBOL = struct.Struct("<IBBHQQ")
# Elf64_Rela: offset, info (symbol index << 32 | type), addend.
_RELA = struct.Struct("<QQq")


@dataclass(frozen=True, slots=True)
class DynamicSymbols:
    """Names in a library's dynamic symbol table, split by whether the library defines them."""

    defined: frozenset[str]  # functions and objects the library exports
    undefined: frozenset[str]  # what it imports from other libraries


@dataclass(frozen=True, slots=True)
class _Section:
    type: int
    offset: int  # in the file
    size: int  # bytes
    link: int  # index of the associated section (string table, symbol table)


def read_dynamic_symbols(path: Path) -> DynamicSymbols:
    """The names a shared library exports and imports (like ``nm -D``)."""
    with path.open("rb") as f:
        sections = _read_sections(f, path)
        dynsym_index = _dynsym_index(sections, path)
        symbols = _read_symbols(f, sections, dynsym_index)
    defined = frozenset(name for name, shndx in symbols if name and shndx != _SHN_UNDEF)
    undefined = frozenset(name for name, shndx in symbols if name and shndx == _SHN_UNDEF)
    return DynamicSymbols(defined=defined, undefined=undefined)


def relocation_offsets(path: Path, names: Iterable[str]) -> dict[str, int]:
    """For each of ``names`` the library imports: the offset, from the library's load address,
    of the slot the dynamic linker fills with the symbol's address (its GOT entry).

    A name with no relocation in the library is absent from the result. A name relocated at
    several places gets the first one, in section order (all hold the same address).
    """
    wanted = set(names)
    name_to_offset: dict[str, int] = {}
    with path.open("rb") as f:
        sections = _read_sections(f, path)
        dynsym_index = _dynsym_index(sections, path)
        symbols = _read_symbols(f, sections, dynsym_index)
        for section in sections:
            if section.type != _SHT_RELA or section.link != dynsym_index:
                continue
            f.seek(section.offset)
            data = f.read(section.size)
            for r_offset, r_info, _ in _RELA.iter_unpack(data):
                name = symbols[r_info >> 32][0]
                if name in wanted and name not in name_to_offset:
                    name_to_offset[name] = r_offset
    return name_to_offset


def _read_sections(f: BinaryIO, path: Path) -> list[_Section]:
    ident = f.read(64)
    if len(ident) < 64 or ident[:4] != _ELF_MAGIC:
        raise ValueError(f"{path} is not an ELF file")
    if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB:
        raise ValueError(
            f"{path} is ELF class {ident[4]}, data encoding {ident[5]}; only 64-bit "
            f"little-endian (class {_ELFCLASS64}, encoding {_ELFDATA2LSB}) is supported"
        )
    (shoff,) = struct.unpack_from("<Q", ident, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", ident, 0x3A)
    if shentsize != _SECTION_HEADER.size:
        raise ValueError(
            f"{path} has section headers of {shentsize} bytes, expected {_SECTION_HEADER.size}"
        )
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    sections = []
    for fields in _SECTION_HEADER.iter_unpack(table):
        _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, _ = fields
        sections.append(_Section(type=sh_type, offset=sh_offset, size=sh_size, link=sh_link))
    return sections


def _dynsym_index(sections: list[_Section], path: Path) -> int:
    for index, section in enumerate(sections):
        if section.type == _SHT_DYNSYM:
            return index
    raise ValueError(f"{path} has no dynamic symbol table (is it a shared library?)")


def _read_symbols(
    f: BinaryIO, sections: list[_Section], dynsym_index: int
) -> list[tuple[str, int]]:
    """(name, section index) of every dynamic symbol, in table order (index 0 is empty)."""
    dynsym = sections[dynsym_index]
    strtab = sections[dynsym.link]
    f.seek(strtab.offset)
    strings = f.read(strtab.size)
    f.seek(dynsym.offset)
    data = f.read(dynsym.size)
    symbols = []
    for st_name, _, _, st_shndx, _, _ in _SYMBOL.iter_unpack(data):
        end = strings.index(b"\0", st_name)
        symbols.append((strings[st_name:end].decode(), st_shndx))
    return symbols
