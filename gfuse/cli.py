"""The ``gfuse`` command line. Errors reach the user as one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time

from typing import IO, Any, NoReturn

import click
import trio

from .errors import leaf
from .mgmt import MgmtError, Server, fetch_graph, parse_servers, parse_volume_spec
from .mounttable import gfuse_mounts
from .options import MountError, MountOptions, parse_options
from .tls import TlsConfig, describe as describe_tls
from .volfile import Graph, VolfileError
from .xlators.client import BrickClient, BrickError

EXIT_USAGE = 2
EXIT_FAIL = 1


class UserError(click.ClickException):
    """An error whose message is all the user needs."""

    exit_code = EXIT_FAIL

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"gfuse: {self.message}", err=True)


#: entry-point group through which other packages add subcommands (``gfuse cluster`` comes from
#: flexvolume.storage.cli): the client package never imports the Kubernetes side
PLUGIN_GROUP = "gfuse.commands"


class PluginGroup(click.Group):
    """A click group that also offers the commands registered under :data:`PLUGIN_GROUP`, loaded only
    when named (``gfuse mount`` does not pay for importing them)."""

    def _plugins(self) -> dict[str, Any]:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        ep = self._plugins().get(cmd_name)
        if ep is None:
            return None
        try:
            loaded = ep.load()
        except ImportError as e:
            raise UserError(f"'gfuse {cmd_name}' is provided by {ep.value}, which cannot be loaded ({e}); "
                            f"install gfuse with its Kubernetes extras") from None
        return loaded if isinstance(loaded, click.Command) else None


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="How much to log on stderr.")
@click.version_option(package_name="gfuse")
def cli(log_level: str) -> None:
    """gfuse: persistent container storage on GlusterFS, in userspace.

    Talks the GlusterFS wire protocol to glusterd and the bricks directly.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("volume_spec", metavar="SERVER[:PORT]:/VOLUME")
@click.option("--backup-volfile-servers", default="", metavar="HOST[:HOST…]",
              help="Other glusterd servers to fetch the volfile from, tried in order.")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 600),
              help="Seconds to wait for glusterd and for each brick.")
@click.option("-o", "options", default="", metavar="OPT[,OPT…]",
              help="Mount options that matter to connecting: ssl-dir=DIR, ssl-cert=, ssl-key=, ssl-ca=, "
                   "secure-mgmt=yes|no, backup-volfile-servers= (others are accepted and ignored).")
def probe(volume_spec: str, backup_volfile_servers: str, timeout: float, options: str) -> None:
    """Check that a volume is reachable: fetch its volfile, handshake with every brick.

    Prints the volume's shape, whether the bricks and glusterd are reached over TLS and, per
    brick, its address, port, handshake result (with the TLS version) and round-trip time.
    Exits 0 only if every brick answered.

    \b
    Example:
        gfuse probe 127.0.0.1:/myvol
    """
    try:
        spec = parse_volume_spec(volume_spec)
        backups = parse_servers(backup_volfile_servers) if backup_volfile_servers else []
        opts = parse_options(options)
    except (ValueError, MountError) as e:
        raise click.UsageError(str(e)) from None
    ok = trio.run(_probe, [spec.server, *backups, *opts.backup_servers], spec.volume, timeout,
                  TlsConfig.from_options(opts))
    sys.exit(0 if ok else EXIT_FAIL)


async def _probe(servers: list[Server], volume: str, timeout: float, tls: TlsConfig | None = None) -> bool:
    t0 = time.perf_counter()
    try:
        server, graph = await fetch_graph(servers, volume, timeout, tls=tls)
    except MgmtError as e:
        raise UserError(str(e)) from None
    except VolfileError as e:
        raise UserError(f"the volfile of {volume!r} from {servers[0]} is malformed: {e}") from None
    fetch_ms = (time.perf_counter() - t0) * 1000
    clients = graph.clients()
    click.echo(f"volume {volume}: {graph.shape()}, {len(clients)} brick(s); volfile from {server} "
               f"in {fetch_ms:.1f} ms")
    click.echo(describe_tls(graph, tls or TlsConfig(), volume))
    bricks = []
    async with trio.open_nursery() as nursery:
        for xl in clients:
            try:
                bricks.append(BrickClient(xl, server, volfile_key=volume, process_name="gfuse-probe",
                                          ping_timeout=timeout, tls=tls))
            except BrickError as e:
                raise UserError(str(e)) from None
        with trio.move_on_after(timeout):
            for b in bricks:
                nursery.start_soon(b.run)
            for b in bricks:
                await b.first_attempt_done.wait()
        rows = []
        for b in bricks:
            port = b.conn.name.rsplit(":", 1)[1] if b.conn is not None and b.is_up else "-"
            if b.is_up and b.handshake_rtt is not None:
                rtt = (await _rtt(b)) * 1000
                how = f"ok ({b.conn.tls_version})" if b.conn is not None and b.conn.tls_version else "ok"
                rows.append((b.name, f"{b.host}:{b.brick_path}", port, how, f"{rtt:.2f} ms"))
            else:
                why = b.last_error if b.first_attempt_done.is_set() else f"no answer within {timeout:g}s"
                rows.append((b.name, f"{b.host}:{b.brick_path}", port, f"DOWN: {why}", "-"))
        nursery.cancel_scope.cancel()
    widths = [max(len(r[i]) for r in rows + [("brick", "address", "port", "handshake", "rtt")]) for i in range(5)]
    for r in [("brick", "address", "port", "handshake", "rtt"), *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    await _probe_cache(graph, bricks, volume)
    down = [r for r in rows if not r[3].startswith("ok")]
    if down:
        click.echo(f"gfuse: {len(down)} of {len(rows)} brick(s) did not answer", err=True)
    return not down


async def _probe_cache(graph: Graph, bricks: list[BrickClient], volume: str) -> None:
    """Whether the volume has cache-invalidation on (client and brick side) and what gfuse makes of it."""
    from .xlators.cachemode import BrickUpcall, brick_upcall, describe_cache

    ups: list[BrickUpcall] = []
    errors: list[str] = []
    for b in bricks:
        try:
            with trio.fail_after(10):
                ups.append(await brick_upcall(b, volume))
        except (OSError, MgmtError, VolfileError, trio.TooSlowError) as e:
            errors.append(f"{b.name}: {e or type(e).__name__}")
    for line in describe_cache(graph, ups, errors):
        click.echo(line)


def _default_log_file(mountpoint: str) -> str:
    name = os.path.realpath(mountpoint).strip("/").replace("/", "-") or "root"
    return f"/var/log/gfuse/{name}.log"


def _setup_file_logging(path: str, level: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(level)


@cli.command()
@click.argument("volume_spec", metavar="SERVER[:PORT]:/VOLUME[/SUBDIR]")
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("-o", "options", default="", metavar="OPT[,OPT…]",
              help="backup-volfile-servers=H1:H2, ro, log-file=PATH, log-level=LEVEL, allow_other, subdir=DIR, "
                   "attribute-timeout=S, entry-timeout=S, ping-timeout=S, read-ahead-kb=N, restartable (survive "
                   "the death of the serving process: the node's holder keeps the FUSE connection).")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground and log to stderr.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(1, 600),
              help="Seconds to wait for the mount to become live.")
@click.option("--ready-fd", type=int, hidden=True)
@click.option("--takeover", is_flag=True,
              help="gfuse mount --takeover MOUNTPOINT: serve a restartable mount (-o restartable) whose process "
                   "died, on the FUSE connection the node's holder kept (what the holder does by itself).")
@click.option("--standby", is_flag=True, hidden=True)
@click.option("--handover", is_flag=True,
              help="With --takeover: an in-place upgrade of a served restartable mount -- this process (this "
                   "version of gfuse) connects, then the serving process is asked to hand the mount over to it "
                   "(it finishes the requests it read and exits); running containers see a short pause.")
@click.option("--stack", is_flag=True,
              help="Mount over the dead gfuse mount at MOUNTPOINT (its server died) instead of refusing it: the "
                   "node's directory is never exposed (what the node agent's repair does).")
def mount(volume_spec: str, mountpoint: str | None, options: str, foreground: bool, timeout: float,
          ready_fd: int | None, takeover: bool, standby: bool, handover: bool, stack: bool) -> None:
    """Mount a GlusterFS volume with gfuse.

    Returns once the mount is live and serves it from a background process (unless -f),
    which logs to /var/log/gfuse/<mountpoint>.log or the log-file option. Exits non-zero
    with one line when the volume cannot be mounted.

    \b
    Examples:
        gfuse mount 127.0.0.1:/vol /mnt/vol
        gfuse mount 10.0.0.5:/vol/projects/a /mnt/a -o backup-volfile-servers=10.0.0.6:10.0.0.7,ro
    """
    if takeover or mountpoint is None:
        if not takeover or mountpoint is not None:
            raise click.UsageError("give SERVER:/VOLUME and MOUNTPOINT, or --takeover MOUNTPOINT")
        _mount_takeover(volume_spec, foreground, timeout, ready_fd, standby, handover)
        return
    try:
        opts = parse_options(options)
        parse_volume_spec(volume_spec)
    except (MountError, ValueError) as e:
        raise UserError(str(e)) from None
    try:
        is_dir = os.path.isdir(mountpoint) if os.stat(mountpoint) else False
        if stack:
            raise UserError(f"--stack: {mountpoint} answers: it is not a dead mount")
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED) and stack:
            is_dir = True
        elif e.errno == errno.ENOTCONN:
            raise UserError(f"{mountpoint} is a dead mount (transport endpoint is not connected): "
                            f"unmount it first with 'umount -l {mountpoint}', or mount over it with --stack") from None
        else:
            is_dir = False
    if not is_dir:
        raise UserError(f"mount point {mountpoint} does not exist or is not a directory")
    if not stack and os.path.ismount(mountpoint):
        raise UserError(f"{mountpoint} is already a mount point")
    log_file = opts.log_file or _default_log_file(mountpoint)
    if foreground or ready_fd is not None:
        if ready_fd is not None:
            _setup_file_logging(log_file, opts.log_level)
        else:
            logging.getLogger().setLevel(opts.log_level)
            if opts.log_file:
                logging.getLogger().addHandler(logging.FileHandler(opts.log_file))
        _serve_here(volume_spec, mountpoint, opts, ready_fd,
                    _restart(opts, volume_spec, mountpoint, options, log_file, stack), stack)
    # daemonize: a detached child serves the mount and tells us when it is live
    proc, answer = _spawn_serving(["mount", volume_spec, mountpoint, "-o", options, "--timeout", str(timeout),
                                   *(["--stack"] if stack else [])], timeout)
    if answer == "OK":
        click.echo(f"gfuse: mounted {volume_spec} on {mountpoint} (pid {proc.pid}, log {log_file})")
        return
    if answer is None:
        exited = proc.poll()
        if exited is None:
            proc.kill()
            raise UserError(f"mounting {volume_spec} timed out after {timeout:g}s (see {log_file})")
        raise UserError(f"the mount process exited with status {exited} before the mount was live (see {log_file})")
    proc.wait(timeout=10)
    raise UserError(answer.removeprefix("ERR ").strip())


def _serve_here(spec: str, mountpoint: str, opts: MountOptions, ready_fd: int | None, restart: Any,
                stack: bool = False) -> NoReturn:
    """Serve in this process until the mount ends; a failure before it is live is reported through
    ``ready_fd`` (the parent waiting in :func:`_spawn_serving`) or, in the foreground, as the error."""
    from .mount import run_foreground  # pyfuse3: only where a mount is served

    errors: list[str] = []

    def ready(msg: str | None) -> None:
        if msg is not None:
            errors.append(msg)
        if ready_fd is not None:
            try:
                os.write(ready_fd, (f"ERR {msg}\n" if msg else "OK\n").encode())
                os.close(ready_fd)
            except OSError:
                pass

    code = run_foreground(spec, mountpoint, opts, ready, restart, stack)
    if errors and ready_fd is None:
        raise UserError(errors[0])
    sys.exit(code)


def _spawn_serving(args: list[str], timeout: float) -> tuple[subprocess.Popen[bytes], str | None]:
    """Start ``gfuse ARGS --ready-fd N`` detached and wait (``timeout`` + 5 s) for its first line:
    "OK", "ERR message", or None when it said nothing in time."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "gfuse.cli", *args, "--ready-fd", str(w)]
    with open(os.devnull, "rb") as devnull_in, open(os.devnull, "wb") as devnull_out:
        proc = subprocess.Popen(cmd, stdin=devnull_in, stdout=devnull_out, stderr=devnull_out,
                                pass_fds=(w,), start_new_session=True, close_fds=True)
    os.close(w)
    return proc, _read_ready(r, timeout + 5)


def _restart(opts: Any, spec: str, mountpoint: str, options: str, log_file: str, stack: bool = False) -> Any:
    """-o restartable: what hands the FUSE fd to the node's holder and keeps the takeover journal."""
    if not opts.restartable:
        return None
    from .takeover import Restart

    return Restart(os.path.abspath(mountpoint) if stack else os.path.realpath(mountpoint), spec, options, log_file,
                   takeover=False)


def _mount_takeover(mountpoint: str, foreground: bool, timeout: float, ready_fd: int | None,
                    standby: bool = False, handover: bool = False) -> None:
    """``gfuse mount --takeover MOUNTPOINT``, as ``mount`` without touching the (waiting) mount point;
    ``standby`` (the holder's): loaded and waiting until the serving process dies."""
    from .takeover import MountRecord, Restart

    mountpoint = os.path.abspath(mountpoint)  # never realpath: that would stat the mount, which waits for us
    try:
        rec = MountRecord.read(mountpoint)
        opts = parse_options(rec.options)
    except MountError as e:
        raise UserError(str(e)) from None
    if foreground or ready_fd is not None:
        if ready_fd is not None:
            _setup_file_logging(rec.log_file, opts.log_level)
        else:
            logging.getLogger().setLevel(opts.log_level)
        _serve_here(rec.spec, rec.mountpoint, opts, ready_fd,
                    Restart(rec.mountpoint, rec.spec, rec.options, rec.log_file, takeover=True, standby=standby,
                            handover=handover))
    proc, answer = _spawn_serving(["mount", "--takeover", mountpoint, *(["--handover"] if handover else [])],
                                  timeout)
    if answer == "OK":
        click.echo(f"gfuse: took over {mountpoint} (pid {proc.pid}, log {rec.log_file})")
        return
    if answer is None:
        if proc.poll() is None:
            proc.kill()
        raise UserError(f"taking over {mountpoint} did not finish within {timeout:g}s (see {rec.log_file})")
    proc.wait(timeout=10)
    raise UserError(answer.removeprefix("ERR ").strip())


def _read_ready(fd: int, timeout: float) -> str | None:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip() or None


@cli.command()
@click.argument("mountpoint", type=click.Path())
@click.option("-l", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
def umount(mountpoint: str, lazy: bool) -> None:
    """Unmount a gfuse mount (the serving process exits by itself)."""
    real = os.path.abspath(mountpoint)  # no realpath: a hung mount would hang us too
    if real not in {m.target for m in gfuse_mounts()}:
        raise UserError(f"{mountpoint} is not a gfuse mount")
    cmd = ["umount"] + (["-l"] if lazy else []) + [real]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise UserError(msg[-1] if msg else f"umount {real} failed with status {p.returncode}")


@cli.command()
@click.argument("mountpoint", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(mountpoint: str | None, as_json: bool) -> None:
    """Show gfuse mounts: each brick up/down and operations in flight."""
    import json

    from .status import query_status

    # one line per mount point: a mount stacked over a dead one (the agent's repair) answers for both
    mounts = list({m.target: (m.source, m.target) for m in gfuse_mounts()}.values())
    if mountpoint is not None:
        real = os.path.abspath(mountpoint)
        mounts = [m for m in mounts if m[1] == real]
        if not mounts:
            raise UserError(f"{mountpoint} is not a gfuse mount")
    out = []
    bad = False
    for source, mp in mounts:
        try:
            out.append(query_status(mp))
        except (OSError, ValueError) as e:
            bad = True
            out.append({"source": source, "mountpoint": mp, "error": f"serving process not answering ({e})"})
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif not out:
        click.echo("no gfuse mounts")
    for s in out if not as_json else []:
        if "error" in s:
            click.echo(f"{s['source']} on {s['mountpoint']}: {s['error']}")
            continue
        ups = sum(b["up"] for b in s["bricks"])
        click.echo(f"{s['source']} on {s['mountpoint']} ({s['shape']}, pid {s['pid']}"
                   f"{', read-only' if s['read_only'] else ''}"
                   f"{', ' + s['mode'] if s.get('mode') else ''}"
                   f"{', gfuse ' + s['version'] if s.get('version') else ''}): {ups}/{len(s['bricks'])} "
                   f"bricks up, "
                   f"{s['pending_brick_calls']} brick calls pending, {s['fuse_requests_in_flight']} FUSE requests "
                   f"in flight")
        for b in s["bricks"]:
            state = "up" if b["up"] else f"DOWN ({b['error']})"
            click.echo(f"  {b['name']:<24} {b['brick']:<40} {state}")
        bad = bad or ups < len(s["bricks"])
    sys.exit(1 if bad else 0)


async def _rtt(b: BrickClient, n: int = 5) -> float:
    """Median round trip of a PING to the brick."""
    assert b.conn is not None
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await b.conn.ping()
        samples.append(time.perf_counter() - t)
    return sorted(samples)[n // 2]


def main(argv: list[str] | None = None) -> None:
    try:
        cli(args=argv, standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as exc:
        e = leaf(exc)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
            click.echo("gfuse: interrupted", err=True)
            sys.exit(130)
        if isinstance(e, SystemExit):
            raise e from None
        if isinstance(e, (MgmtError, BrickError)):
            click.echo(f"gfuse: {e}", err=True)
            sys.exit(EXIT_FAIL)
        if isinstance(e, OSError):
            click.echo(f"gfuse: {e.strerror or e}", err=True)
            sys.exit(EXIT_FAIL)
        logging.getLogger("gfuse").debug("unexpected error", exc_info=exc)
        click.echo(f"gfuse: internal error: {type(e).__name__}: {e} (run with --log-level DEBUG for details)",
                   err=True)
        sys.exit(EXIT_FAIL)


def mount_helper(argv: list[str] | None = None) -> None:
    """``mount.fuse.gfuse SOURCE DIR [-o OPTS] [-fnsv] [-t TYPE]``: what mount(8) and fstab call."""
    args = list(sys.argv[1:] if argv is None else argv)
    pos: list[str] = []
    opts: list[str] = []
    foreground = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            opts.append(args[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif a == "-t" and i + 1 < len(args):
            i += 2
            continue
        elif a.startswith("-"):
            foreground = foreground or "f" in a[1:]
        else:
            pos.append(a)
        i += 1
    if len(pos) != 2:
        click.echo("usage: mount.fuse.gfuse SERVER[:PORT]:/VOLUME[/SUBDIR] MOUNTPOINT [-o OPTIONS]", err=True)
        sys.exit(EXIT_USAGE)
    main(["mount", pos[0], pos[1], "-o", ",".join(opts)] + (["-f"] if foreground else []))




# ------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
