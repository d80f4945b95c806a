"""The gfuse CSI plugin (``gfuse-csi``): Identity, Node and Controller services over gRPC.

- :mod:`flexvolume.csi.server` — the command line and the gRPC server on a unix socket.
- :mod:`flexvolume.csi.identity`, :mod:`flexvolume.csi.node`, :mod:`flexvolume.csi.controller` — the
  three CSI services.
- :mod:`flexvolume.csi.volumes` — volume ids, volume context, capability checks, gRPC errors.
- :mod:`flexvolume.csi.stubs` — loads the CSI protobuf/gRPC stubs (``flexvolume.csi.csi_pb2``,
  ``flexvolume.csi.csi_pb2_grpc``) that :mod:`flexvolume.csi.genstubs` generates at install or image-build
  time (``python3 -m flexvolume.csi.stubs``); never generates or downloads anything at import.

Needs the ``csi`` extra: ``pip install 'gfuse[csi]'`` (grpcio, grpcio-tools, protobuf).
"""

DEFAULT_DRIVER_NAME = "gfuse.csi.example.org"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
DEFAULT_ENDPOINT = "unix:///var/lib/kubelet/plugins/gfuse.csi.example.org/csi.sock"
DEFAULT_STATE_DIR = "/run/gfuse/csi"
