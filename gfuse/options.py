"""``-o`` mount options: what they mean, and the one parser of them (CLI, mount helper, agent).

Pure: no FUSE, no trio; the node agent imports it to check options before it starts a mount.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .volspec import Server, check_subdir, parse_servers

TRUE_WORDS = frozenset({"on", "yes", "true", "enable", "enabled", "1"})
FALSE_WORDS = frozenset({"off", "no", "false", "disable", "disabled", "0", ""})


def parse_bool(value: object, default: bool | None = None) -> bool:
    """Gluster's and Kubernetes' truthy strings (on/off, yes/no, true/false, enable/disable, 1/0).

    ``True``/``False`` pass through; anything else is a ValueError unless ``default`` is given.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    if default is not None:
        return default
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


#: options mount(8) and fstab pass along that mean nothing to us
IGNORED_OPTIONS = {"defaults", "rw", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "users", "exec",
                   "noexec", "suid", "nosuid", "dev", "nodev", "relatime", "noatime", "atime", "strictatime",
                   "nodiratime", "diratime", "async", "sync", "owner", "group", "comment", "x-systemd.automount"}
#: SELinux labels for the whole mount (kubelet adds ``context="…"`` when a CSIDriver has ``seLinuxMount: true``):
#: gfuse does not interpret them, they go to the kernel's mount(2) as given (libfuse passes them through)
SELINUX_OPTIONS = ("context", "fscontext", "defcontext", "rootcontext")
#: TLS (gfuse/tls.py): where the client's certificate, key and CA are, and whether glusterd speaks TLS
TLS_OPTIONS = ("ssl-dir", "ssl-cert", "ssl-key", "ssl-ca", "secure-mgmt")
#: options that name files on the host (the node's admin decides them, not a volume's user)
HOST_PATH_OPTIONS = frozenset({"log-file", "ssl-dir", "ssl-cert", "ssl-key", "ssl-ca"})
KNOWN_OPTIONS = {"backup-volfile-servers", "backupvolfile-server", "ro", "log-file", "log-level", "allow_other",
                 "subdir", "attribute-timeout", "entry-timeout", "read-ahead-kb", "ping-timeout", "restartable",
                 *SELINUX_OPTIONS, *TLS_OPTIONS}
#: an SELinux context (user:role:type[:level]); a level may hold commas (s0:c1,c2) and dots (c0.c1023)
_SELINUX_CONTEXT = re.compile(r"[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+(:[A-Za-z0-9_.:,-]+)?")


def split_options(text: str | None) -> list[str]:
    """``a,b=c,context="u:r:t:s0:c1,c2"`` → items: commas inside double quotes do not split (SELinux
    levels hold commas; mount(8) and the kernel quote them the same way)."""
    items: list[str] = []
    item: list[str] = []
    quoted = False
    for ch in text or "":
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(item))
            item = []
        else:
            item.append(ch)
    items.append("".join(item))
    return [i.strip() for i in items if i.strip()]


class MountError(Exception):
    """The volume cannot be mounted; the message is one line for the user."""


@dataclass
class MountOptions:
    backup_servers: list[Server] = field(default_factory=list)
    read_only: bool = False
    log_file: str | None = None
    log_level: str = "INFO"
    allow_other: bool = False
    #: hand the FUSE fd to the node's holder and keep a takeover journal: a successor process serves the same
    #: connection when this one dies (gfuse/takeover.py, issue 12)
    restartable: bool = False
    subdir: str = ""
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    read_ahead_kb: int = 1024
    ping_timeout: float | None = None
    #: ``key="value"`` items for the kernel's mount(2) (SELINUX_OPTIONS), normalized with double quotes
    kernel_options: list[str] = field(default_factory=list)
    #: TLS_OPTIONS: ``ssl-dir=DIR`` (DIR/glusterfs.pem, .key, .ca), ``ssl-cert=``/``ssl-key=``/``ssl-ca=`` (one
    #: file each, wins over ssl-dir); unset: the volfile's paths, else OpenSSL's directory (/usr/lib/ssl on
    #: Debian). ``secure-mgmt=yes|no``: TLS to glusterd; unset: on iff /var/lib/glusterd/secure-access exists
    ssl_dir: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    ssl_ca: str | None = None
    secure_mgmt: bool | None = None

    def libfuse_kernel_options(self) -> list[str]:
        """:attr:`kernel_options` as libfuse's ``-o`` parser needs them (a comma is escaped, or it splits)."""
        from .untrusted import libfuse_escape  # untrusted imports this module

        return [libfuse_escape(o) for o in self.kernel_options]


def parse_options(text: str | None) -> MountOptions:
    """``-o`` options: unknown ones are an error (a typo must not silently mount something else)."""
    o = MountOptions()
    if not text:
        return o
    for item in split_options(text):
        key, _, value = item.partition("=")
        if key in IGNORED_OPTIONS or key.startswith("x-"):
            continue
        if key not in KNOWN_OPTIONS:
            raise MountError(f"unknown mount option {key!r} (known: {', '.join(sorted(KNOWN_OPTIONS))})")
        try:
            if key in ("backup-volfile-servers", "backupvolfile-server"):
                o.backup_servers += parse_servers(value)
            elif key == "ro":
                o.read_only = True
            elif key == "log-file":
                o.log_file = value
            elif key == "log-level":
                lv = value.upper()
                if lv not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "TRACE", "NONE"):
                    raise ValueError(f"log-level must be DEBUG, INFO, WARNING or ERROR, not {value!r}")
                o.log_level = {"TRACE": "DEBUG", "NONE": "CRITICAL"}.get(lv, lv)
            elif key == "allow_other":
                o.allow_other = True
            elif key == "restartable":
                o.restartable = parse_bool(value or "yes")
            elif key == "subdir":
                o.subdir = value.strip("/")
                check_subdir(o.subdir)
            elif key == "attribute-timeout":
                o.attr_timeout = float(value)
            elif key == "entry-timeout":
                o.entry_timeout = float(value)
            elif key == "read-ahead-kb":
                o.read_ahead_kb = int(value)
            elif key == "ping-timeout":
                o.ping_timeout = float(value)
            elif key in ("ssl-dir", "ssl-cert", "ssl-key", "ssl-ca"):
                if not value.startswith("/"):
                    raise ValueError(f"{value!r} is not an absolute path")
                setattr(o, key.replace("-", "_"), value)
            elif key == "secure-mgmt":
                o.secure_mgmt = parse_bool(value or "yes")
            elif key in SELINUX_OPTIONS:
                label = value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
                if not _SELINUX_CONTEXT.fullmatch(label):
                    raise ValueError(f"{value!r} is not an SELinux context (user:role:type:level)")
                o.kernel_options = [k for k in o.kernel_options if not k.startswith(key + "=")]
                o.kernel_options.append(f'{key}="{label}"')
        except ValueError as e:
            raise MountError(f"bad value for mount option {key!r}: {e}") from None
    return o
