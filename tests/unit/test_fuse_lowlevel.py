"""gfuse.fuse_lowlevel finds pyfuse3's statics in its ELF symbol table, or says clearly why not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pyfuse3
import pytest

from gfuse.fuse_lowlevel import Unsupported, elf_symbols

NAMES = {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops", "__pyx_f_7pyfuse3_fuse_lookup"}


def test_symbols_of_the_installed_pyfuse3() -> None:
    sym = elf_symbols(pyfuse3.__file__, NAMES)
    assert set(sym) == NAMES and all(v > 0 for v in sym.values())
    # the ops table and the session pointer are distinct variables (a 44-pointer table, then others)
    assert abs(sym["__pyx_v_7pyfuse3_session"] - sym["__pyx_v_7pyfuse3_fuse_ops"]) >= 44 * 8


def test_a_stripped_build_is_refused_with_a_reason(tmp_path: Path) -> None:
    if shutil.which("strip") is None:
        pytest.skip("no strip(1)")
    copy = tmp_path / "pyfuse3.so"
    shutil.copy(pyfuse3.__file__, copy)
    subprocess.run(["strip", str(copy)], check=True, timeout=60)
    with pytest.raises(Unsupported, match="stripped"):
        elf_symbols(str(copy), NAMES)


def test_not_an_elf_file(tmp_path: Path) -> None:
    f = tmp_path / "x.so"
    f.write_bytes(b"#!/bin/sh\n" * 10)
    with pytest.raises(Unsupported, match="not a 64-bit"):
        elf_symbols(str(f), NAMES)
