"""gfuse: a userspace GlusterFS client (protocol, replicate, distribute) and FUSE filesystem."""

__version__ = "0.1.0"
