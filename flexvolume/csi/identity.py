"""CSI Identity service: who the plugin is, what it offers, whether it is healthy."""

from __future__ import annotations

import logging
from collections.abc import Callable

from google.protobuf import wrappers_pb2

from .stubs import csi_pb2, csi_pb2_grpc
from .volumes import CsiError, rpc

log = logging.getLogger(__name__)

PluginCapability = csi_pb2.PluginCapability


def plugin_version() -> str:
    try:
        from importlib.metadata import version

        return version("gfuse")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source tree)
        return "0.0.0+unknown"


class IdentityService(csi_pb2_grpc.IdentityServicer):
    """``controller``: advertise CONTROLLER_SERVICE; ``health``: raises CsiError when unhealthy."""

    def __init__(self, driver_name: str, controller: bool, health: Callable[[], None] | None = None) -> None:
        self.driver_name = driver_name
        self.controller = controller
        self.health = health

    @rpc
    def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=plugin_version())

    @rpc
    def GetPluginCapabilities(self, request, context):
        caps = []
        if self.controller:
            caps.append(PluginCapability(service=PluginCapability.Service(
                type=PluginCapability.Service.CONTROLLER_SERVICE)))
        caps.append(PluginCapability(volume_expansion=PluginCapability.VolumeExpansion(
            type=PluginCapability.VolumeExpansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc
    def Probe(self, request, context):
        # A node agent that is down or restarting (a DaemonSet update, a crash) is "not ready", not an error
        # (issue 13): the CO waits and probes again; the mounts it serves keep serving meanwhile.
        if self.health is not None:
            try:
                self.health()
            except CsiError as e:
                log.warning("Probe: not ready: %s", e.message)
                return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=False))
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
