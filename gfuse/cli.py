"""The ``gfuse`` command line. Errors reach the user as one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import errno
import logging
import sys
import time

import click
import trio

from .errors import leaf
from .mgmt import MgmtError, Server, fetch_graph, parse_servers, parse_volume_spec
from .volfile import VolfileError
from .xlators.client import BrickClient, BrickError

EXIT_USAGE = 2
EXIT_FAIL = 1


class UserError(click.ClickException):
    """An error whose message is all the user needs."""

    exit_code = EXIT_FAIL

    def show(self, file=None) -> None:  # type: ignore[override]
        click.echo(f"gfuse: {self.message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
def probe(volume_spec: str, backup_volfile_servers: str, timeout: float) -> None:
    """Check that a volume is reachable: fetch its volfile, handshake with every brick.

    Prints the volume's shape and, per brick, its address, port, handshake result and
    round-trip time. Exits 0 only if every brick answered.

    \b
    Example:
        gfuse probe 127.0.0.1:/myvol
    """
    try:
        spec = parse_volume_spec(volume_spec)
        backups = parse_servers(backup_volfile_servers) if backup_volfile_servers else []
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    ok = trio.run(_probe, [spec.server, *backups], spec.volume, timeout)
    sys.exit(0 if ok else EXIT_FAIL)


async def _probe(servers: list[Server], volume: str, timeout: float) -> bool:
    t0 = time.perf_counter()
    try:
        server, graph = await fetch_graph(servers, volume, timeout)
    except MgmtError as e:
        raise UserError(str(e)) from None
    except VolfileError as e:
        raise UserError(f"the volfile of {volume!r} from {servers[0]} is malformed: {e}") from None
    fetch_ms = (time.perf_counter() - t0) * 1000
    clients = graph.clients()
    click.echo(f"volume {volume}: {graph.shape()}, {len(clients)} brick(s); volfile from {server} "
               f"in {fetch_ms:.1f} ms")
    bricks = []
    async with trio.open_nursery() as nursery:
        for xl in clients:
            try:
                bricks.append(BrickClient(xl, server, volfile_key=volume, process_name="gfuse-probe",
                                          ping_timeout=timeout))
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
                rows.append((b.name, f"{b.host}:{b.brick_path}", port, "ok", f"{rtt:.2f} ms"))
            else:
                why = b.last_error if b.first_attempt_done.is_set() else f"no answer within {timeout:g}s"
                rows.append((b.name, f"{b.host}:{b.brick_path}", port, f"DOWN: {why}", "-"))
        nursery.cancel_scope.cancel()
    widths = [max(len(r[i]) for r in rows + [("brick", "address", "port", "handshake", "rtt")]) for i in range(5)]
    for r in [("brick", "address", "port", "handshake", "rtt"), *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    down = [r for r in rows if r[3] != "ok"]
    if down:
        click.echo(f"gfuse: {len(down)} of {len(rows)} brick(s) did not answer", err=True)
    return not down


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
    except BaseException as exc:  # noqa: BLE001 - every error becomes one line, never a traceback
        e = leaf(exc)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
            click.echo("gfuse: interrupted", err=True)
            sys.exit(130)
        if isinstance(e, SystemExit):
            raise e
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


if __name__ == "__main__":
    main()
