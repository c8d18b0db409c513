# syntax=docker/dockerfile:1
# Build: docker build -t ferrovol/ferrovol:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferrovol

# Runtime: the binary plus exactly the tools the node service runs
# (mkfs.*, resize2fs, xfs_growfs, btrfs, blkid), and for the RBD engine
# Ceph's libraries (loaded at run time), its mappers (rbd map from
# ceph-common, rbd-nbd, rbd-fuse), and for the CephFS engine ceph-fuse and
# libcephfs (its own copies, loaded at run time).
# Checked by deploy/check.py.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs btrfs-progs util-linux \
       librbd1 librados2 libcephfs2 ceph-common rbd-nbd rbd-fuse ceph-fuse \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ferrovol /usr/local/bin/ferrovol
ENTRYPOINT ["/usr/local/bin/ferrovol"]
CMD ["serve"]
