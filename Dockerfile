# gfuse container images (Debian bookworm), built from the repository root:
#
#   podman build -t localhost/gfuse:0.1.0 .                             # default target "gfuse": gfuse-agent,
#                                                                       # gfuse-csi, gfuse-flexvolume, gfuse
#   podman build --target glusterd -t localhost/gfuse-glusterd:0.1.0 .  # converged mode: the GlusterFS server
#
# No registry reachable (e.g. the test machines): build a base with debootstrap and pass
# --build-arg BASE_IMAGE=localhost/base:1; packages already in the base are not installed again, and
# wheels in daemonset/image/wheelhouse/ replace PyPI. See daemonset/README.md, "Building the image".
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS debian
ENV LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1
COPY daemonset/image/apt-install.sh /usr/local/sbin/apt-install

# ---- build: the project and its dependencies in a venv (pyfuse3 compiles against libfuse3) ----------------
FROM debian AS build
COPY daemonset/image/wheelhouse/ /src/wheelhouse/
# A compiler only when pyfuse3 has to be built here (a wheelhouse with a pyfuse3 wheel needs none: offline)
RUN if ls /src/wheelhouse/pyfuse3-*.whl > /dev/null 2>&1; then apt-install python3 python3-venv; \
    else apt-install python3 python3-venv python3-dev gcc libc6-dev pkg-config libfuse3-dev; fi
COPY pyproject.toml README.md /src/
COPY gfuse/ /src/gfuse/
COPY flexvolume/ /src/flexvolume/
# extras: k8s (kubernetes client: FlexVolume provisioner), csi (grpcio, protobuf, grpcio-tools: gfuse-csi)
ARG GFUSE_EXTRAS=k8s,csi
ENV GFUSE_CSI_STUBS_DIR=/opt/gfuse/csi-stubs
RUN python3 -m venv /opt/gfuse \
    && if ls /src/wheelhouse/*.whl > /dev/null 2>&1; then set -- --no-index --find-links=/src/wheelhouse; fi \
    && /opt/gfuse/bin/pip install --no-cache-dir --disable-pip-version-check "$@" "/src[${GFUSE_EXTRAS}]" \
    && /opt/gfuse/bin/python3 -c "import gfuse.cli, flexvolume, flexvolume.metrics, pyfuse3, msgpack, trio, prometheus_client"
# Generate the CSI stubs into $GFUSE_CSI_STUBS_DIR at build time (importing flexvolume.csi never generates or
# downloads anything: without them gfuse-csi refuses to start). The spec's descriptor comes from the ember-csi
# wheel (extended to spec v1.9: flexvolume/csi/genstubs.py): from the wheelhouse when there is one, else pip
# downloads it.
RUN if [ -f /src/flexvolume/csi/stubs.py ]; then \
        for w in /src/wheelhouse/ember_csi-*.whl; do [ -f "$w" ] && export GFUSE_CSI_EMBER_WHEEL="$w"; done; \
        /opt/gfuse/bin/python3 -m flexvolume.csi.stubs; \
    fi

# ---- glusterd: GlusterFS server pods of converged mode (daemonset/converged/) --------------------------------
FROM debian AS glusterd
# The package's /var/lib/glusterd (hooks, option groups) is kept aside: the pod mounts the node's
# /var/lib/glusterd over it and seeds it from this copy without overwriting anything.
RUN apt-install glusterfs-server procps \
    && mkdir -p /usr/share/gfuse \
    && cp -a /var/lib/glusterd /usr/share/gfuse/glusterd-defaults
# glusterd (24007 clients and peers, 24008 RDMA/peers), bricks from 49152 up: all on the node (hostNetwork)
EXPOSE 24007/tcp 24008/tcp 49152-49251/tcp
CMD ["/bin/sh", "-c", "cp -a -n /usr/share/gfuse/glusterd-defaults/. /var/lib/glusterd/ && exec glusterd --no-daemon --log-file=- --log-level=INFO"]

# ---- gfuse (default): node agent, CSI plugin, FlexVolume driver, installer and provisioner ----------------------------
FROM debian AS gfuse
ENV GFUSE_CSI_STUBS_DIR=/opt/gfuse/csi-stubs
# fuse3: fusermount3 and libfuse3 (pyfuse3); glusterfs-client: the native client, for comparison and
# debugging on a node; systemd: systemd-run, which the agent uses to put mount servers in host scopes
# (--mount-wrapper); util-linux: mount/umount/nsenter.
RUN apt-install python3 fuse3 glusterfs-client systemd util-linux ca-certificates
COPY --from=build /opt/gfuse /opt/gfuse
COPY daemonset/image/flexvolume-shim.sh /usr/local/lib/gfuse/flexvolume-shim.sh
COPY daemonset/image/install-flexvolume.sh /usr/local/bin/gfuse-install-flexvolume
# the FlexVolume provisioner's gluster CLI in converged mode: nsenter into the node's glusterd
COPY daemonset/image/node-gluster.sh /usr/local/bin/gfuse-node-gluster
RUN for cmd in gfuse mount.fuse.gfuse gfuse-agent gfuse-csi gfuse-flexvolume gfuse-provisioner; do \
        ln -sf "/opt/gfuse/bin/$cmd" "/usr/local/bin/$cmd"; \
        [ -e "/opt/gfuse/bin/$cmd" ] || echo "warning: this version of the package has no $cmd command" >&2; \
    done \
    && ln -sf /opt/gfuse/bin/mount.fuse.gfuse /sbin/mount.fuse.gfuse \
    && chmod 0755 /usr/local/bin/gfuse-install-flexvolume /usr/local/bin/gfuse-node-gluster \
    && mkdir -p /run/gfuse /var/lib/gfuse /var/log/gfuse
# The manifests choose the command: gfuse-agent, gfuse-csi --mode=node|controller, gfuse-install-flexvolume,
# gfuse-provisioner.
CMD ["gfuse-agent"]
