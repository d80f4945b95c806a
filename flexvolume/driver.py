"""The gfuse FlexVolume driver (``gfuse-flexvolume``): kubelet's exec contract.

kubelet (``pkg/volume/flexvolume``) runs ``<plugin-dir>/<vendor>~gfuse/gfuse`` with:

- ``init`` → ``{"status": "Success", "capabilities": {"attach": false, "selinuxRelabel": false,
  "fsGroup": false, "supportsMetrics": true, "requiresFSResize": false}}``. kubelet fills every key the
  answer leaves out with its default (``defaultCapabilities`` in driver-call.go: attach, selinuxRelabel,
  fsGroup and requiresFSResize true), so each is said: fsGroup false — kubelet never chowns a whole
  volume; requiresFSResize false — a PV's size is a quota the bricks enforce, there is no filesystem on
  the node to grow (true would make kubelet call ``expandfs`` or resize the mount itself after expansion);
- ``mount <mount-dir> <json-options>`` → mounts the volume on ``<mount-dir>``
  (``/var/lib/kubelet/pods/<uid>/volumes/<vendor>~gfuse/<name>``) through the gfuse node agent;
- ``unmount <mount-dir>`` → unmounts it (an unmounted directory is a success: kubelet retries); with
  the agent down, the driver unmounts it itself (see :func:`cmd_unmount`);
- anything else (attach, detach, waitforattach, mountdevice, getvolumename, expandvolume, …) →
  ``{"status": "Not supported"}``, so kubelet falls back to its defaults.

The JSON options are strings only (kubelet marshals a ``map[string]string``): kubelet's own keys
``kubernetes.io/fsType``, ``kubernetes.io/readwrite`` ("rw"/"ro"), ``kubernetes.io/pvOrVolumeName``,
``kubernetes.io/pod.name``, ``kubernetes.io/pod.namespace``, ``kubernetes.io/pod.uid``,
``kubernetes.io/serviceAccount.name``, ``kubernetes.io/mounterArgs.FsGroup``, ``kubernetes.io/secret/<key>``
(base64), plus the ``options`` of the PV's ``flexVolume`` source:

``volume`` (required)   ``server:/volume[/subdir]``
``backupServers``       other glusterd hosts for the volfile, separated by ``:`` ``,`` or spaces
``readOnly``            ``"true"``/``"false"``; also read-only when kubelet says ``kubernetes.io/readwrite: ro``
``mountOptions``        more ``gfuse mount -o`` items, comma-separated (e.g. ``ping-timeout=10,log-level=DEBUG``);
                        ``allow_other`` is always added (containers run as any user). kubelet refuses a PV's
                        ``spec.mountOptions`` for FlexVolume ("Mount options are not supported for this volume
                        type"), so this option is where mount options go (the provisioner puts its class's
                        there); ``context="…"`` (SELinux, commas allowed inside the quotes) reaches mount(2)

Output: exactly one JSON object on stdout, nothing on stderr (kubelet reads both together), exit 0
with ``Success`` (and ``Not supported``), 1 with ``Failure`` and a message a cluster admin can act on.
Every call finishes in bounded time: each agent call has a timeout and a watchdog ends the process
(with a Failure) if anything else stalls. Environment: ``GFUSE_AGENT_SOCKET`` (default
``/run/gfuse/agent.sock``), ``GFUSE_FLEXVOLUME_TIMEOUT`` (seconds for one mount or unmount, default 60).

Secrets (``secretRef`` on the PV) are decoded and checked but not used: gfuse authenticates to
GlusterFS by address, as the native client does. ``FsGroup`` is ignored for the same reason the
capability is false: ownership belongs on the volume, not to a recursive chown by kubelet.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import signal
import sys
from typing import Any, NoReturn

from gfuse.options import MountError, parse_bool, split_options
from gfuse.untrusted import check_options
from gfuse.volspec import parse_volume_spec

from .protocol import DEFAULT_SOCKET

SUCCESS, FAILURE, NOT_SUPPORTED = "Success", "Failure", "Not supported"
CAPABILITIES = {"attach": False, "selinuxRelabel": False, "fsGroup": False, "supportsMetrics": True,
                "requiresFSResize": False}
#: agent failures (AgentError.code) after which ``unmount`` is done by the driver itself
AGENT_DOWN = ("unavailable", "timeout")
#: fsType values that mean "this driver's filesystem"; kubelet passes "" when the PV gives none
FS_TYPES = ("", "gfuse", "fuse.gfuse", "glusterfs")
KNOWN_COMMANDS = ("init", "mount", "unmount")
_SPEC = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d+)?:/[A-Za-z0-9_.-]+(/[^\0]*)?$")

K_FSTYPE = "kubernetes.io/fsType"
K_READWRITE = "kubernetes.io/readwrite"
K_PV_NAME = "kubernetes.io/pvOrVolumeName"
K_POD_NAME = "kubernetes.io/pod.name"
K_POD_NAMESPACE = "kubernetes.io/pod.namespace"
K_POD_UID = "kubernetes.io/pod.uid"
K_SERVICE_ACCOUNT = "kubernetes.io/serviceAccount.name"
K_FSGROUP = "kubernetes.io/mounterArgs.FsGroup"
K_SECRET_PREFIX = "kubernetes.io/secret/"


class DriverFailure(Exception):
    """Ends the call with ``Failure`` and this message."""


def _timeout() -> float:
    try:
        return max(5.0, min(600.0, float(os.environ.get("GFUSE_FLEXVOLUME_TIMEOUT", "60"))))
    except ValueError:
        return 60.0


def _bool(opts: dict[str, str], key: str) -> bool:
    try:
        return parse_bool(opts.get(key, ""))
    except ValueError:
        pass
    raise DriverFailure(f"option {key!r} must be \"true\" or \"false\", not {opts[key]!r} (PV spec.flexVolume.options)")


def parse_mount_options(text: str) -> dict[str, Any]:
    """kubelet's JSON → what the agent needs: source, options, readonly, context. Raises DriverFailure."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise DriverFailure(f"the mount options are not valid JSON ({e}); kubelet passes a JSON object as the "
                            f"third argument") from None
    if not isinstance(raw, dict):
        raise DriverFailure(f"the mount options must be a JSON object, not {type(raw).__name__}")
    # kubelet only sends strings; be lenient with hand-written calls ("readOnly": true)
    opts = {str(k): (json.dumps(v) if isinstance(v, bool) else str(v)) for k, v in raw.items() if v is not None}
    volume = opts.get("volume", "").strip()
    if not volume:
        raise DriverFailure("option 'volume' is missing: set spec.flexVolume.options.volume of the PV to "
                            "\"server:/volume[/subdir]\"")
    if not _SPEC.match(volume):
        raise DriverFailure(f"option 'volume' must be \"server:/volume[/subdir]\", not {volume!r}")
    try:
        parse_volume_spec(volume)  # the subdirectory: a plain path inside the volume, nothing libfuse would split
    except ValueError as e:
        raise DriverFailure(f"option 'volume': {e}") from None
    fstype = opts.get(K_FSTYPE, "").strip()
    if fstype not in FS_TYPES:
        raise DriverFailure(f"fsType {fstype!r} is not supported by the gfuse driver: leave spec.flexVolume.fsType "
                            f"empty (or \"glusterfs\")")
    rw = opts.get(K_READWRITE, "rw").strip() or "rw"
    if rw not in ("rw", "ro"):
        raise DriverFailure(f"{K_READWRITE} must be \"rw\" or \"ro\", not {rw!r}")
    readonly = rw == "ro" or _bool(opts, "readOnly")
    # pods run as any user: without allow_other only root could use the mount
    mount_options = ["allow_other"] + [o for o in split_options(opts.get("mountOptions", "")) if o != "allow_other"]
    try:  # a PV may not name files of the node (log-file=, certificates): the agent decides them
        check_options(mount_options, "PV spec.flexVolume.options.mountOptions")
    except MountError as e:
        raise DriverFailure(str(e)) from None
    backups = opts.get("backupServers", "").strip()
    if backups:
        hosts = [h for h in re.split(r"[,\s]+", backups) if h] if re.search(r"[,\s]", backups) else backups.split(":")
        if any(":" in h for h in hosts) or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", h) for h in hosts if h):
            raise DriverFailure(f"option 'backupServers' must list host names separated by ':' or ',' (glusterd "
                                f"port 24007), not {backups!r}")
        mount_options.append("backup-volfile-servers=" + ":".join(h for h in hosts if h))
    for key, value in opts.items():
        if key.startswith(K_SECRET_PREFIX):
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise DriverFailure(f"secret key {key[len(K_SECRET_PREFIX):]!r} is not valid base64") from None
    fsgroup = opts.get(K_FSGROUP, "").strip()
    if fsgroup and not fsgroup.lstrip("-").isdigit():
        raise DriverFailure(f"{K_FSGROUP} must be a number, not {fsgroup!r}")
    context = {k: opts[key] for k, key in (("pod", K_POD_NAME), ("namespace", K_POD_NAMESPACE), ("pod_uid", K_POD_UID),
                                          ("service_account", K_SERVICE_ACCOUNT), ("pv", K_PV_NAME))
               if opts.get(key)}
    return {"source": volume, "options": mount_options, "readonly": readonly, "context": context}


def _mount_dir(arg: str) -> str:
    if not arg or not os.path.isabs(arg) or "\0" in arg:
        raise DriverFailure(f"the mount directory must be an absolute path, not {arg!r}")
    return os.path.normpath(arg)


def _client():
    from .agentclient import AgentClient

    return AgentClient(os.environ.get("GFUSE_AGENT_SOCKET") or DEFAULT_SOCKET)


def cmd_mount(args: list[str]) -> dict[str, Any]:
    from .agentclient import AgentError

    if len(args) != 2:
        raise DriverFailure(f"usage: mount <mount-dir> <json-options> (got {len(args)} argument(s))")
    target = _mount_dir(args[0])
    req = parse_mount_options(args[1])
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, mode=0o750, exist_ok=True)
        os.mkdir(target, 0o750)  # never stat() it: it may be a mount whose server died
    except FileExistsError:
        pass
    except OSError as e:
        raise DriverFailure(f"cannot create the mount directory {target}: {e.strerror}") from None
    try:
        resp = _client().mount(req["source"], target, options=req["options"], readonly=req["readonly"],
                               timeout=_timeout(), context=req["context"])
    except AgentError as e:
        raise DriverFailure(e.message) from None
    what = "already mounted" if resp.get("already") else "mounted"
    return {"status": SUCCESS, "message": f"{what} {req['source']} on {target}"
                                          f"{' read-only' if req['readonly'] else ''}"}


def cmd_unmount(args: list[str]) -> dict[str, Any]:
    """Unmount through the agent; if the agent cannot be reached (not running, restarting, stuck), here.

    Why not a Failure that says "start the agent": kubelet calls ``unmount`` while tearing a pod down
    and retries it for as long as it fails, the pod stays Terminating meanwhile, and the volume dir
    cannot be removed while it is a mount point. If the agent is gone for good (its DaemonSet deleted,
    a node being drained, a crash loop) nothing would ever end that. The unmount itself needs no agent:
    the mount is a plain FUSE mount of this namespace, and its serving process exits by itself when the
    kernel ends the FUSE session. So the driver does what the agent would: refuses anything that is not
    a gfuse mount, unmounts (lazily if busy), removes the directory (kubelet would remove it next) —
    which is also how a restarting agent learns the mount is gone: it drops state entries whose
    directory no longer exists instead of mounting them again — and answers Success.
    """
    from .agentclient import AgentError

    if len(args) != 1:
        raise DriverFailure(f"usage: unmount <mount-dir> (got {len(args)} argument(s))")
    target = _mount_dir(args[0])
    try:
        resp = _client().unmount(target, timeout=_timeout())
    except AgentError as e:
        if e.code not in AGENT_DOWN:
            raise DriverFailure(e.message) from None
        return _unmount_here(target, e.message)
    return {"status": SUCCESS, "message": f"unmounted {target}" if resp.get("was_mounted")
            else f"{target} was not mounted"}


def _unmount_here(target: str, why: str) -> dict[str, Any]:
    """``unmount`` without the agent (:func:`cmd_unmount`); never stats the target (it may be dead)."""
    import subprocess

    from gfuse.mounttable import mounts_at

    stack = mounts_at(target)
    if stack and not stack[-1].is_gfuse:
        raise DriverFailure(f"{target} is mounted with {stack[-1].fstype} from {stack[-1].source}, which is not a "
                            f"gfuse mount; not unmounting it")
    for _ in range(len(stack)):
        top = mounts_at(target)
        if not top or not top[-1].is_gfuse:
            break
        error = ""
        for cmd in (["umount", "-c", target], ["umount", "-c", "-l", target]):  # -l: busy (a process in it)
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False,
                                   stdin=subprocess.DEVNULL)
                error = (r.stderr or r.stdout).strip().rpartition("\n")[2] or f"exit status {r.returncode}"
            except (OSError, subprocess.TimeoutExpired) as e:
                error = str(e)
            if mounts_at(target) != top:
                break
        else:
            raise DriverFailure(f"the gfuse agent is down ({why}) and unmounting {target} here failed: {error}; "
                                f"start the gfuse agent on this node (the gfuse DaemonSet pod)")
    try:
        os.rmdir(target)
    except OSError:
        pass  # not empty or gone: kubelet removes it (and reports what is in the way)
    what = f"unmounted {target}" if stack else f"{target} was not mounted"
    return {"status": SUCCESS, "message": f"{what} without the gfuse agent ({why})"}


def run(argv: list[str]) -> tuple[dict[str, Any], int]:
    """One driver call: (the JSON object to print, the exit status)."""
    if not argv:
        return {"status": FAILURE, "message": "usage: gfuse-flexvolume init | mount <mount-dir> <json> | "
                                              "unmount <mount-dir>"}, 1
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "init":
            return {"status": SUCCESS, "capabilities": dict(CAPABILITIES)}, 0
        if cmd == "mount":
            return cmd_mount(args), 0
        if cmd == "unmount":
            return cmd_unmount(args), 0
    except DriverFailure as e:
        return {"status": FAILURE, "message": " ".join(str(e).split())}, 1
    return {"status": NOT_SUPPORTED, "message": f"the gfuse driver does not implement {cmd!r}"}, 0


def _emit(obj: dict[str, Any], code: int) -> NoReturn:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        try:
            n = os.write(1, data)
        except OSError:
            break
        data = data[n:]
    os._exit(code)


def main(argv: list[str] | None = None) -> NoReturn:
    argv = list(sys.argv[1:] if argv is None else argv)
    # nothing may reach stderr: kubelet parses stdout and stderr together as one JSON document
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass
    sys.stderr = open(os.devnull, "w")  # lives as long as the process
    limit = int(_timeout() + 15)

    def watchdog(signum: int, frame: object) -> None:
        _emit({"status": FAILURE, "message": f"the gfuse driver did not finish {argv[0] if argv else ''!s} within "
                                             f"{limit}s; see the gfuse agent's log"}, 1)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(limit)
    try:
        obj, code = run(argv)
    except BaseException as e:  # noqa: BLE001 - never a traceback: kubelet must get JSON
        obj, code = {"status": FAILURE, "message": f"internal error in the gfuse driver: {type(e).__name__}: {e}"}, 1
    signal.alarm(0)
    _emit(obj, code)


if __name__ == "__main__":
    main()
