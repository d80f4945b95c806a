"""Kubernetes node bridge for gfuse: FlexVolume driver, node agent and its client.

- :mod:`flexvolume.agent` — the node agent (``gfuse-agent``): one long-running process per node that
  owns every gfuse mount, answers msgpack requests on a unix socket and keeps its mount table in a
  msgpack state file; it re-adopts and repairs mounts after its own restart.
- :mod:`flexvolume.agentclient` — :class:`~flexvolume.agentclient.AgentClient`, the synchronous client
  the FlexVolume driver and the CSI plugin use.
- :mod:`flexvolume.driver` — the FlexVolume driver (``gfuse-flexvolume``), kubelet's exec contract.
- :mod:`flexvolume.protocol` — message framing shared by the agent and its client.
- :mod:`flexvolume.state` — the agent's state file (the host's mount table is :mod:`gfuse.mounttable`).

The driver and client modules import only the standard library and ``msgpack``: kubelet executes
the driver for every mount and it must start fast. Nothing is defined here (constants live in
:mod:`flexvolume.protocol` and :mod:`flexvolume.state`), so the package also works where an older
editable install maps ``flexvolume`` as a namespace package.
"""
