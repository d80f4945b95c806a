"""Test tooling (not shipped): loopback gluster clusters, kubelet and pod stand-ins, an in-memory brick.

Used by tests/, bench/ and scripts/demo.sh; never imported by gfuse/ or flexvolume/.
"""
