"""An open file stays usable after its name is gone (POSIX; pjdfstest unlink/14.t)."""

from __future__ import annotations

import errno
import os


def test_open_file_survives_unlink(vol_replica3, gfuse_mount) -> None:
    m = gfuse_mount(vol_replica3)
    path = m.path / f"unlinked-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"Hello, World!")
        os.unlink(path)
        st = os.fstat(fd)  # the kernel's getattr carries no handle: gfuse must use its own
        assert st.st_nlink == 0 and st.st_size == 13
        assert os.pread(fd, 13, 0) == b"Hello, World!"
        os.pwrite(fd, b"!", 13)
        assert os.fstat(fd).st_size == 14
        try:
            os.fchmod(fd, 0o600)
        except OSError as e:  # the inode has no name left to address it by; never "not connected"
            assert e.errno in (errno.ENOENT, errno.ESTALE), e
        assert os.stat(m.path).st_mode  # the mount is fine
    finally:
        os.close(fd)
    assert not path.exists()
