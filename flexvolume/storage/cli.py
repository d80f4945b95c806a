"""``gfuse cluster``: set up and inspect the storage side (independent mode: nodes with glusterd running).

Registered as a ``gfuse`` subcommand through the ``gfuse.commands`` entry-point group (see
:class:`gfuse.cli.PluginGroup`), so the client package does not depend on this one; also runs as
``gfuse-cluster`` or ``python -m flexvolume.storage.cli``.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

from gfuse.cli import EXIT_FAIL, UserError

from . import cluster as sc
from .api import StorageError
from .glusterd import Glusterd

P = ParamSpec("P")
R = TypeVar("R")


@click.group("cluster")
@click.option("--glusterd-socket", default="/var/run/glusterd.socket", show_default=True,
              envvar="GFUSE_GLUSTERD_SOCKET",
              help="glusterd's unix socket (management commands are refused over TCP).")
@click.option("--gluster-command", default="gluster", show_default=True, envvar="GFUSE_GLUSTER_COMMAND",
              help="The gluster CLI, with any prefix, e.g. 'kubectl exec -n glusterfs ds/glusterfs -- gluster'.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds to wait for each glusterd answer.")
@click.pass_context
def cluster_group(ctx: click.Context, glusterd_socket: str, gluster_command: str, timeout: float) -> None:
    """Storage cluster set-up for provisioning (independent mode: nodes with glusterd running)."""
    ctx.obj = Glusterd(glusterd_socket or None, command=shlex.split(gluster_command), timeout=timeout)


def _storage_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A StorageError becomes one line for the user, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StorageError as e:
            raise UserError(str(e)) from None

    return wrapper


@cluster_group.command("init")
@click.argument("nodes", nargs=-1, required=True, metavar="HOST[:/BRICK_DIR]...")
@click.option("--brick-dir", default="/var/lib/gfuse/bricks", show_default=True,
              help="Brick pool directory on nodes given without one.")
@click.option("--pool", default="gfuse-pool", show_default=True, help="Name of the pool volume.")
@click.option("--replica", type=click.IntRange(1, 16), default=None, help="Replica count of the pool [min(3, nodes)].")
@click.option("--pool-size", default="0", show_default=True,
              help="Capacity of each node's brick pool for the volume backend (e.g. 500G); 0 = not accounted.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
@click.pass_obj
@_storage_errors
def cluster_init(gd: Glusterd, nodes: tuple[str, ...], brick_dir: str, pool: str, replica: int | None, pool_size: str,
                 as_json: bool) -> None:
    """Peer NODES (the first is the one whose glusterd socket is used), create the pool volume,
    register each node's brick pool. Safe to run again.

    \b
    Example (on the first storage node):
        gfuse cluster init node1:/srv/bricks node2:/srv/bricks node3:/srv/bricks --pool-size 500G
    """
    size = sc.parse_size(pool_size)
    specs = [sc.NodeSpec.parse(n, brick_dir, size) for n in nodes]
    st = sc.init(gd, specs, pool=pool, replica=replica, say=lambda m: click.echo(f"gfuse cluster: {m}", err=True))
    click.echo(json.dumps(st, indent=1) if as_json else _format_cluster_status(st))


@cluster_group.command("status")
@click.option("--pool", default="gfuse-pool", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_storage_errors
def cluster_status(gd, pool: str, as_json: bool) -> None:
    """Peers, the pool volume and its bricks, brick pools and what is allocated on them."""
    st = sc.status(gd, pool)
    click.echo(json.dumps(st, indent=1) if as_json else _format_cluster_status(st))
    if st.get("pool") is None or not all(p["connected"] for p in st["peers"]):
        sys.exit(EXIT_FAIL)


@cluster_group.command("gc")
@click.option("--node", required=True, help="This node's name as registered (run on that node).")
@click.option("--pool", default="gfuse-pool", show_default=True)
@click.option("--dry-run", is_flag=True)
@click.pass_obj
@_storage_errors
def cluster_gc(gd: Glusterd, node: str, pool: str, dry_run: bool) -> None:
    """Remove brick directories of deleted per-PV volumes from this node's brick pools."""
    for path in sc.gc(gd, node, pool, dry_run):
        click.echo(("would remove " if dry_run else "removed ") + path)


def _format_cluster_status(st: dict[str, Any]) -> str:
    lines = ["peers:"]
    for p in st.get("peers", []):
        lines.append(f"  {p['host']:<24} {'connected' if p['connected'] else 'DISCONNECTED':<13} {p['state']}")
    if not st.get("peers"):
        lines.append("  (none: a single-node cluster)")
    pool = st.get("pool")
    if pool is None:
        lines.append("pool volume: none (run gfuse cluster init)")
    else:
        lines.append(f"pool volume: {pool['name']} {pool['status']} {pool['type']} replica {pool['replica']}, "
                     f"quota {'on' if pool['quota'] else 'OFF'}")
        for b in pool["bricks"]:
            lines.append(f"  {b['brick']}  {'up' if b['online'] else 'DOWN' if b['online'] is False else '?'}")
    lines.append("brick pools:")
    for bp in st.get("brick_pools", []):
        cap = f"{bp['size_bytes']} bytes" if bp["size_bytes"] else "not accounted"
        lines.append(f"  {bp['host']}:{bp['path']}  {bp['volumes']} volume(s), "
                     f"{bp['allocated_bytes']} bytes allocated, {cap}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``gfuse-cluster``: the same commands as ``gfuse cluster``."""
    try:
        cluster_group.main(args=argv, prog_name="gfuse cluster", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("gfuse: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
