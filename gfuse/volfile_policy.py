"""Which volfiles gfuse serves: a volume whose graph gfuse would serve wrongly is refused, in one line.

gfuse implements ``protocol/client``, ``cluster/replicate`` and ``cluster/distribute``; every other
translator of a client volfile is either passed through to its only child (it changes how fast, not what
is stored: the performance translators, io-stats, the debug ones) or makes the data on the bricks mean
something gfuse does not know, and then serving the volume would corrupt it or show wrong contents
(sharding: a file is its first shard plus files under ``/.shard``; erasure coding; client-side encryption
or compression; cloudsync's stubs) or drop a guarantee the volume promises (read-only, WORM). Those are
refused by :func:`check_graph`, as are options of the implemented translators that change placement or
on-disk names gfuse does not follow, and volfiles whose structure or values the graph builder cannot use
(a missing ``remote-host``, a port that is not a number), so that a hostile or broken glusterd gets a
:class:`~gfuse.volfile.VolfileError`, never another exception. Pure: no I/O.

What each translator does is gluster's (``xlators/`` of glusterfs; ``glusterd-volgen.c`` builds client
graphs from ``protocol/client``, the cluster translators, ``features/cloudsync``, ``features/shard``,
``features/utime``, ``features/read-only`` (snapshots), ``features/cdc`` (``network.compression``),
``features/quiesce`` (gfproxy), ``features/quota`` (op-version 1), the performance translators,
``features/snapview-client`` (``features.uss``), the debug translators, and ``debug/io-stats``).
"""

from __future__ import annotations

import math

from .options import parse_bool
from .volfile import Graph, VolfileError, Xlator

#: translators gfuse implements itself
IMPLEMENTED = frozenset({"protocol/client", "cluster/replicate", "cluster/distribute"})

#: passed through to their only child: they change caching, timing, statistics, not what is stored
PASS_THROUGH = frozenset({
    "debug/io-stats", "debug/trace", "debug/error-gen", "debug/delay-gen",
    "features/utime",  # the ctime it keeps is sent by gfuse's credentials (ctime flags)
    "features/quiesce",  # holds fops while gfproxyd fails over
    "features/gfid-access",  # the virtual .gfid directory of aux-gfid mounts
    "meta-autoload/meta", "system/posix-acl",
})

#: translators whose presence means gfuse would serve the volume wrongly, and why
REFUSED = {
    "cluster/disperse": "disperse (erasure-coded) volumes are not supported: gfuse does not implement erasure "
                        "coding, the bricks hold fragments of each file",
    "cluster/ec": "disperse (erasure-coded) volumes are not supported: gfuse does not implement erasure coding",
    "cluster/stripe": "striped volumes are not supported: each brick holds stripes of a file",
    "cluster/nufa": "NUFA placement (cluster.nufa) is not supported: new files go to the local brick, not where "
                    "their names hash",
    "cluster/switch": "switch placement (cluster.switch) is not supported: files go to bricks by name pattern, not "
                      "where their names hash",
    "features/shard": "sharding is on (features.shard): a file's data past its first shard lives in separate "
                      "files under /.shard, which gfuse does not join; gfuse would show and write only the first "
                      "shard",
    "features/cloudsync": "cloudsync is on (features.cloudsync): files may be stubs whose data lives in a remote "
                          "store, which gfuse does not fetch",
    "features/cdc": "network compression is on (network.compression): the bricks send and expect compressed "
                    "data, which gfuse does not implement",
    "encryption/crypt": "client-side encryption is on (features.encryption): the bricks hold encrypted data, which "
                        "gfuse does not implement",
    "features/quota": "client-side quota (a volume of op-version 1) would not be enforced by gfuse",
    "features/metadisp": "metadata dispersal is not supported: file data and metadata live on different "
                         "subvolumes",
    "features/snapview-client": "user-serviceable snapshots are on (features.uss): gfuse does not serve .snaps; "
                                "turn it off (gluster volume set VOLUME features.uss off)",
}
#: translators refused when their option (default off) is on
REFUSED_WHEN_ON = {
    "features/read-only": (("read-only",), "the volume is read-only (features/read-only: a snapshot volume or "
                                           "features.read-only), which gfuse does not enforce"),
    "features/worm": (("worm", "worm-file-level"), "WORM is on (features.worm): gfuse does not enforce "
                                                   "write-once-read-many"),
}
#: distribute options gfuse does not follow: names would hash, or layouts be named, differently
DHT_DEFAULT_XATTR = "trusted.glusterfs.dht"
#: the rsync regex gfuse hashes names with (gfuse.dhthash.RSYNC_REGEX), as gluster's default
DHT_DEFAULT_RSYNC_REGEX = r"^\.(.+)\.[^.]+$"
QUORUM_TYPES = ("none", "auto", "fixed")


def _on(xl: Xlator, key: str) -> bool:
    return parse_bool(xl.options.get(key, "off"), default=True)  # unreadable: take it as on, refuse


def _number(xl: Xlator, key: str, *, integer: bool = False, low: float = 0.0,
            high: float = float("inf")) -> None:
    value = xl.options.get(key)
    if value is None or value == "":
        return
    try:
        n: float = int(value) if integer else float(value)
    except ValueError:
        raise VolfileError(f"translator {xl.name!r}: option {key} {value!r} is not a number") from None
    if not math.isfinite(n) or not low <= n <= high:
        raise VolfileError(f"translator {xl.name!r}: option {key} {value!r} is out of range")


def check_xlator(xl: Xlator) -> None:
    """Raise :class:`VolfileError` if gfuse cannot serve ``xl`` correctly (its children are checked apart)."""
    t = xl.type
    n = len(xl.subvolumes)
    where = f"translator {xl.name!r} ({t})"
    if t in REFUSED:
        raise VolfileError(f"{REFUSED[t]} ({where}); gfuse cannot serve this volume")
    if t in REFUSED_WHEN_ON:
        keys, why = REFUSED_WHEN_ON[t]
        if any(_on(xl, k) for k in keys):
            raise VolfileError(f"{why} ({where}); gfuse cannot serve this volume")
    if t == "protocol/client":
        if n:
            raise VolfileError(f"{where} has subvolumes; a protocol/client translator is a leaf")
        for key in ("remote-host", "remote-subvolume"):
            if not xl.options.get(key):
                raise VolfileError(f"{where} has no option {key}")
        _number(xl, "remote-port", integer=True, low=1, high=65535)
        _number(xl, "ping-timeout", low=0, high=1e9)
        transport = xl.options.get("transport-type", "tcp")
        if transport.split(",")[0].strip() not in ("tcp", "socket"):
            raise VolfileError(f"{where}: transport-type {transport} is not supported (gfuse speaks TCP)")
        if xl.options.get("transport.address-family", "inet") == "unix":
            raise VolfileError(f"{where}: unix-socket bricks are not supported (gfuse speaks TCP)")
        return
    if n == 0:
        raise VolfileError(f"{where} has no subvolumes (gfuse serves client volfiles, whose leaves are "
                           f"protocol/client translators)")
    if t == "cluster/replicate":
        if xl.options.get("thin-arbiter"):
            raise VolfileError(f"thin-arbiter replication is not supported ({where}); gfuse cannot serve this "
                               f"volume")
        pend = xl.options.get("afr-pending-xattr")
        if pend is not None and len(pend.split(",")) != n:
            raise VolfileError(f"{where}: afr-pending-xattr names {len(pend.split(','))} replicas, it has {n}")
        qt = xl.options.get("quorum-type")
        if qt is not None and qt not in QUORUM_TYPES:
            raise VolfileError(f"{where}: quorum-type {qt!r} is not one of {', '.join(QUORUM_TYPES)}")
        _number(xl, "quorum-count", integer=True, low=1, high=n)
        return
    if t == "cluster/distribute":
        if xl.options.get("xattr-name", DHT_DEFAULT_XATTR) != DHT_DEFAULT_XATTR:
            raise VolfileError(f"{where}: layouts under xattr-name {xl.options['xattr-name']!r} are not "
                               f"supported (gfuse reads {DHT_DEFAULT_XATTR})")
        if n > 1:
            for key in ("rsync-hash-regex", "extra-hash-regex"):
                value = xl.options.get(key)
                if value and not (key == "rsync-hash-regex" and value == DHT_DEFAULT_RSYNC_REGEX):
                    raise VolfileError(f"{where}: cluster.{key} is set; gfuse hashes names as gluster does by "
                                       f"default and would place files where other clients do not look")
        return
    if n > 1:
        raise VolfileError(f"gfuse cannot serve translator {xl.name!r} of type {t} with {n} children "
                           f"(e.g. disperse volumes are not supported)")
    if t in PASS_THROUGH or t in REFUSED_WHEN_ON or t.startswith("performance/"):
        return
    raise VolfileError(f"{where} is not known to gfuse, which cannot tell whether it changes what the bricks "
                       f"store; gfuse cannot serve this volume")


def check_graph(graph: Graph) -> None:
    """Raise :class:`VolfileError` (one line) unless gfuse can serve every translator of ``graph``."""
    for xl in graph.top.walk():
        check_xlator(xl)
