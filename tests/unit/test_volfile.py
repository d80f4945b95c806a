"""Volfile parsing (gfuse.volfile): hand-written graphs and volfiles glusterd 10.3 really generated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gfuse.volfile import VolfileError, parse

DATA = Path(__file__).resolve().parents[1] / "data"

SMALL = """\
# a comment
volume v-client-0
    type protocol/client
    option remote-host  127.0.0.2
    option remote-subvolume /bricks/with space/b0
    option flag
end-volume

volume v-client-1
    type protocol/client
    option remote-host 127.0.0.2
end-volume

volume v-replicate-0
    type cluster/replicate
    option afr-pending-xattr v-client-0,v-client-1
    subvolumes v-client-1 v-client-0
end-volume

volume v
    type debug/io-stats
    subvolumes v-replicate-0
end-volume
"""


def test_types_options_subvolumes_top() -> None:
    g = parse(SMALL)
    assert list(g.xlators) == ["v-client-0", "v-client-1", "v-replicate-0", "v"]
    assert g.top.name == "v" and g.top.type == "debug/io-stats"
    c0 = g.xlators["v-client-0"]
    assert c0.type == "protocol/client"
    assert c0.options == {
        "remote-host": "127.0.0.2",
        "remote-subvolume": "/bricks/with space/b0",  # value keeps its inner spaces
        "flag": "",
    }
    afr = g.xlators["v-replicate-0"]
    assert [x.name for x in afr.subvolumes] == ["v-client-1", "v-client-0"]  # order as written
    assert afr.subvolumes[0] is g.xlators["v-client-1"]
    assert g.top.subvolumes == [afr]
    assert [c.name for c in g.clients()] == ["v-client-0", "v-client-1"]  # volfile order
    assert [x.name for x in g.top.walk()] == ["v", "v-replicate-0", "v-client-1", "v-client-0"]
    assert g.top.find("protocol/client") == [g.xlators["v-client-1"], g.xlators["v-client-0"]]
    assert g.text == SMALL
    assert g.checksum == hashlib.sha256(SMALL.encode()).hexdigest()
    assert g.shape() == "replicate 1 x 2"


def test_option_value_with_several_spaces_and_tabs() -> None:
    g = parse("volume a\n\ttype t/x\n\toption   key   a  b\tc  \nend-volume\n")
    assert g.top.options == {"key": "a  b\tc"}


def test_last_block_is_top_even_if_unreferenced() -> None:
    g = parse("volume a\n type t/a\nend-volume\nvolume b\n type t/b\nend-volume\n")
    assert g.top.name == "b"


def test_shared_subvolume_walked_once() -> None:
    text = (
        "volume c\n type protocol/client\nend-volume\n"
        "volume x\n type t/x\n subvolumes c\nend-volume\n"
        "volume y\n type t/y\n subvolumes c x\nend-volume\n"
    )
    assert [x.name for x in parse(text).top.walk()] == ["y", "c", "x"]


def _client(name: str) -> str:
    return f"volume {name}\n    type protocol/client\n    option remote-subvolume /b/{name}\nend-volume\n"


def test_shape_single_brick() -> None:
    assert parse(_client("v-client-0") + "volume v\n type debug/io-stats\n subvolumes v-client-0\nend-volume\n") \
        .shape() == "single brick (1 x 1)"


def test_shape_distribute() -> None:
    text = _client("c0") + _client("c1") + "volume d\n type cluster/distribute\n subvolumes c0 c1\nend-volume\n"
    assert parse(text).shape() == "distribute 2 x 1"


def test_shape_disperse() -> None:
    text = "".join(_client(f"c{i}") for i in range(3))
    text += "volume e\n type cluster/disperse\n subvolumes c0 c1 c2\nend-volume\n"
    assert parse(text).shape() == "disperse 1 x 3"


# ---------------------------------------------------------- volfiles glusterd really generated


def test_real_single_brick_volfile() -> None:
    """1-brick volume: glusterd 10.3 still puts a cluster/distribute with one child on top of the client."""
    g = parse((DATA / "volfile_dist1.vol").read_text())
    assert g.shape() == "distribute 1 x 1"
    (c,) = g.clients()
    assert c.options["remote-host"] and c.options["remote-subvolume"].endswith("/b")
    assert c.options["ping-timeout"] == "42"
    assert g.top.type == "debug/io-stats"
    assert "username" not in c.options  # the untrusted volfile
    (dht,) = g.top.find("cluster/distribute")
    assert dht.subvolumes == [c]


def test_real_replicate_1x3() -> None:
    g = parse((DATA / "volfile_replica3.vol").read_text())
    assert g.shape() == "replicate 1 x 3"
    clients = g.clients()
    assert [c.name.rsplit("-", 1)[1] for c in clients] == ["0", "1", "2"]
    assert [c.options["remote-subvolume"].rsplit("/", 1)[1] for c in clients] == ["r0", "r1", "r2"]
    (afr,) = g.top.find("cluster/replicate")
    assert afr.name.endswith("-replicate-0")
    assert afr.subvolumes == clients
    assert afr.options["afr-pending-xattr"] == ",".join(c.name for c in clients)
    assert g.top.type == "debug/io-stats"


def test_real_distributed_replicate_2x3() -> None:
    g = parse((DATA / "volfile_distrep.vol").read_text())
    assert g.shape() == "distributed-replicate 2 x 3"
    clients = g.clients()
    assert len(clients) == 6
    afrs = g.top.find("cluster/replicate")
    assert [a.name.rsplit("-", 1)[1] for a in afrs] == ["0", "1"]
    assert [s.name for s in afrs[0].subvolumes] == [c.name for c in clients[:3]]
    assert [s.name for s in afrs[1].subvolumes] == [c.name for c in clients[3:]]
    (dht,) = g.top.find("cluster/distribute")
    assert dht.subvolumes == afrs
    assert [x.name for x in g.top.walk()][0] == g.top.name


# ---------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text,match",
    [
        ("volume a\n type t/a\n subvolumes nope\nend-volume\n", "not defined"),
        ("volume a\n type t/a\n subvolumes a\nend-volume\n", "not defined"),  # itself
        ("volume a\n type t/a\n subvolumes b\nend-volume\nvolume b\n type t/b\nend-volume\n", "not defined"),
        ("volume a\n type t/a\n", "missing 'end-volume'"),
        ("volume a\n type t/a\nvolume b\n type t/b\nend-volume\n", "inside volume"),
        ("option k v\nvolume a\n type t/a\nend-volume\n", "outside a volume"),
        ("volume a\n type t/a\nend-volume\noption k v\n", "outside a volume"),
        ("type t/a\n", "outside a volume"),
        ("end-volume\n", "outside a volume"),
        ("subvolumes a\n", "outside a volume"),
        ("volume a\nend-volume\n", "no type"),
        ("volume a b\n type t/a\nend-volume\n", "expected 'volume NAME'"),
        ("volume\n", "expected 'volume NAME'"),
        ("volume a\n type t/a extra\nend-volume\n", "expected 'type"),
        ("volume a\n type t/a\n option\nend-volume\n", "option without a key"),
        ("volume a\n type t/a\n frobnicate x\nend-volume\n", "unknown keyword"),
        ("volume a\n type t/a\nend-volume\nvolume a\n type t/a\nend-volume\n", "defined twice"),
        ("", "no volume"),
        ("# only a comment\n\n", "no volume"),
    ],
)
def test_errors(text: str, match: str) -> None:
    with pytest.raises(VolfileError, match=match):
        parse(text)


def test_error_names_the_line() -> None:
    with pytest.raises(VolfileError, match="line 3"):
        parse("volume a\n type t/a\n subvolumes ghost\nend-volume\n")


def test_volfile_error_is_a_value_error() -> None:
    assert issubclass(VolfileError, ValueError)
