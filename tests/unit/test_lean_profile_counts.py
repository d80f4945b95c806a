"""bench/mount_bench.py's reading of ``gluster volume profile VOL info incremental --xml``.

gluster 10.3's CLI writes the upcall counters of a brick (cache invalidations it sent to other
clients) as ``<fop>`` elements named after the fop of the same index: a gfuse 4 KiB write to a file
the native client had touched showed as WRITE 3 + "STAT" 3 + "READLINK" 3 per write, while the text
output of the same interval says UPCALL and CI_IATT. The XML below is one brick of such an interval
(300 gfuse O_DIRECT writes to a file the native mount wrote), trimmed to its fop list.
"""

from __future__ import annotations

import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "mount_bench.py"


def _mount_bench():
    spec = importlib.util.spec_from_file_location("mount_bench_under_test", _PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _fop(name: str, hits: int, lat: float) -> str:
    return (f"<fop><name>{name}</name><hits>{hits}</hits><avgLatency>{lat:f}</avgLatency>"
            f"<minLatency>{lat:f}</minLatency><maxLatency>{lat:f}</maxLatency></fop>")


def _brick(fops: str) -> str:
    return (f"<brick><brickName>127.0.0.2:/b</brickName><cumulativeStats><fopStats>{_fop('WRITE', 9, 1.0)}"
            f"</fopStats><totalRead>0</totalRead><totalWrite>0</totalWrite></cumulativeStats>"
            f"<intervalStats><fopStats>{fops}</fopStats><duration>0</duration><totalRead>0</totalRead>"
            f"<totalWrite>1228800</totalWrite></intervalStats></brick>")


# as gluster 10.3 printed it (latencies in ns)
_WRITES_NOTIFYING_NATIVE = "".join([
    _fop("OPEN", 1, 69195.0), _fop("WRITE", 300, 502785.68), _fop("FLUSH", 1, 13204.0),
    _fop("FSYNC", 1, 270917.0), _fop("LOOKUP", 1, 72407.0), _fop("INODELK", 1, 14959.0),
    _fop("FINODELK", 3, 2866454.37), _fop("FXATTROP", 3, 61219.67),
    _fop("STAT", 301, 0.0), _fop("READLINK", 300, 0.0),
])


def _root(*bricks: str) -> ET.Element:
    return ET.fromstring(f"<cliOutput><volProfile><brickCount>{len(bricks)}</brickCount>"
                         f"{''.join(bricks)}</volProfile></cliOutput>")


def test_upcall_counters_are_not_counted_as_stat_and_readlink_fops():
    mb = _mount_bench()
    fops, upcalls, rd, wr = mb.profile_counts(_root(*[_brick(_WRITES_NOTIFYING_NATIVE)] * 3))
    assert "STAT" not in fops and "READLINK" not in fops
    assert fops["WRITE"] == 900  # the interval's, not the cumulative figures
    assert upcalls == {"UPCALL": 903, "CI_IATT": 900}
    assert (rd, wr) == (0, 3 * 1228800)


def test_a_real_stat_and_an_upcall_in_one_interval():
    mb = _mount_bench()
    fops, upcalls, _, _ = mb.profile_counts(_root(_brick(
        _fop("STAT", 5, 41000.0) + _fop("WRITE", 2, 9000.0) + _fop("STAT", 2, 0.0) + _fop("UNLINK", 1, 0.0))))
    assert fops == {"STAT": 5, "WRITE": 2}
    assert upcalls == {"UPCALL": 2, "CI_UNLINK": 1}


def test_zero_latency_fops_outside_the_upcall_names_stay_fops():
    # RELEASE/FORGET-like entries carry no latency but are fops the client made
    mb = _mount_bench()
    fops, upcalls, _, _ = mb.profile_counts(_root(_brick(_fop("FLUSH", 1, 0.0) + _fop("RELEASE", 4, 0.0))))
    assert fops == {"FLUSH": 1, "RELEASE": 4} and upcalls == {}
