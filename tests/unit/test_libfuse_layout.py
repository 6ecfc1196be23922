"""The libfuse layouts blockfs/_libfuse.py relies on, checked against the installed headers:
the slot numbers of `struct fuse_lowlevel_ops`, the offset of `fh` in `struct fuse_file_info`
and of `max_background` / `congestion_threshold` in `struct fuse_conn_info` (compiled with gcc
against libfuse3-dev, which scripts/setup-system installs)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from blockfs import _libfuse
from kernel_target import in_ci

HEADER = "/usr/include/fuse3/fuse_lowlevel.h"


def _compile_and_run(tmp_path, body: str) -> str:
    if shutil.which("gcc") is None or not os.path.exists(HEADER):
        msg = "gcc or libfuse3-dev missing (scripts/setup-system)"
        if in_ci():
            pytest.fail(msg + " [CI is set: failing instead of skipping]")
        pytest.skip(msg)
    src = tmp_path / "layout.c"
    src.write_text("#define FUSE_USE_VERSION 34\n#include <fuse_lowlevel.h>\n#include <stddef.h>\n"
                   "#include <stdio.h>\nint main(void) {\n" + body + "return 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I/usr/include/fuse3", "-o", str(exe), str(src)], check=True,
                   capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_lowlevel_ops_slots_and_struct_offsets_match_the_header(tmp_path):
    body = "".join(
        f'printf("{name} %zu\\n", offsetof(struct fuse_lowlevel_ops, {name}) / sizeof(void *));\n'
        for name in _libfuse._SLOTS)
    body += ('printf("fi.fh %zu\\n", offsetof(struct fuse_file_info, fh));\n'
             'printf("conn.max_background %zu\\n", offsetof(struct fuse_conn_info, max_background));\n'
             'printf("conn.congestion_threshold %zu\\n", '
             'offsetof(struct fuse_conn_info, congestion_threshold));\n')
    got = dict(line.split() for line in _compile_and_run(tmp_path, body).splitlines())
    assert {k: int(v) for k, v in got.items() if k in _libfuse._SLOTS} == _libfuse._SLOTS
    assert int(got["fi.fh"]) == _libfuse._FI_FH
    assert int(got["conn.max_background"]) == _libfuse._CONN_MAX_BACKGROUND
    assert int(got["conn.congestion_threshold"]) == _libfuse._CONN_CONGESTION_THRESHOLD


def test_fuse_out_header_is_16_bytes():
    # struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; } (fuse_kernel.h)
    assert _libfuse._OUT_HEADER.size == 16
    assert _libfuse._OUT_HEADER.pack(16 + 4096, 0, 7) == (4112).to_bytes(4, "little") + bytes(4) + (7).to_bytes(8, "little")


def test_pyfuse3s_handler_result_static_is_found_and_holds_none():
    """InlineRequests takes pyfuse3's handler coroutines from its `py_retval` static: the symbol
    is in the installed pyfuse3 and holds None outside a request (what `locate` checks)."""
    from blockfs._fuse_inline import InlineRequests
    addr = InlineRequests.locate()
    assert ctypes.c_void_p.from_address(addr).value == id(None)


def test_a_pyfuse3_static_that_is_not_there_is_a_value_error():
    """PyfuseSession.locate and InlineRequests.locate find pyfuse3's statics through one
    lookup; a name pyfuse3 does not have stops it (the mount then runs without the hook)."""
    found = _libfuse.pyfuse3_statics("session", "py_retval")
    assert set(found) == {"session", "py_retval"} and all(a > 0 for a, _ in found.values())
    with pytest.raises(ValueError, match="no_such_static"):
        _libfuse.pyfuse3_statics("session", "no_such_static")
