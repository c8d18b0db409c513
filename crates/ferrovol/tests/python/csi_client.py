"""A CSI client in Python's grpcio with its default channel options, as a
debugging tool or test harness would be written: compiles proto/csi.proto
with grpcio-tools, then makes real calls on a unix socket. Several calls
share one channel, so later requests reuse grpcio's HPACK dynamic table.

Usage: csi_client.py PROTO_DIR SOCKET OUT_DIR
Prints one line per call ("method: outcome") and exits 0 when every call
answered as expected.
"""

import importlib
import os
import sys

import grpc
from grpc_tools import protoc


def compile_proto(proto_dir, out_dir):
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", os.path.join(proto_dir, "csi.proto")])
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")


def main():
    proto_dir, socket, out_dir = sys.argv[1:4]
    pb, rpc = compile_proto(proto_dir, out_dir)
    # Default options: grpcio picks the :authority itself (the socket path).
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        identity = rpc.IdentityStub(channel)
        controller = rpc.ControllerStub(channel)
        info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
        print(f"GetPluginInfo: {info.name} {info.vendor_version}")
        ready = identity.Probe(pb.ProbeRequest(), timeout=10)
        print(f"Probe: ready={ready.ready.value}")
        caps = identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10)
        print(f"GetPluginCapabilities: {len(caps.capabilities)} capabilities")
        mount = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                                    access_mode=pb.VolumeCapability.AccessMode(mode=1))
        ids = []
        for i in range(5):
            v = controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"python-{i}", volume_capabilities=[mount],
                capacity_range=pb.CapacityRange(required_bytes=8 << 20)), timeout=30)
            ids.append(v.volume.volume_id)
        print(f"CreateVolume x5: {len(set(ids))} volumes")
        listed = controller.ListVolumes(pb.ListVolumesRequest(), timeout=10)
        print(f"ListVolumes: {len(listed.entries)} entries")
        try:
            controller.CreateVolume(pb.CreateVolumeRequest(name="", volume_capabilities=[mount]), timeout=10)
            sys.exit("CreateVolume without a name succeeded")
        except grpc.RpcError as e:
            print(f"CreateVolume without a name: {e.code().name}")
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                sys.exit(f"unexpected code {e.code()}: {e.details()}")
        for vid in ids:
            controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=30)
        print(f"DeleteVolume x5: ok")
        left = controller.ListVolumes(pb.ListVolumesRequest(), timeout=10)
        print(f"ListVolumes after delete: {len(left.entries)} entries")
        if len(set(ids)) != 5 or len(listed.entries) != 5 or len(left.entries) != 0:
            sys.exit("volumes did not add up")


if __name__ == "__main__":
    main()
