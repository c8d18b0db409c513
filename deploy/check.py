#!/usr/bin/env python3
"""Offline checks of the Kubernetes deployment and examples.

Renders every kustomize target and example, validates built-in objects
against the schemas of the oldest and newest supported Kubernetes, checks
the snapshot custom resources for the fields their CRDs require, and
cross-checks the manifests against the driver itself (its flags, its
capabilities, its topology key, the tools its node service runs).

Usage: check.py FERROVOL_BINARY   (run from the repository root)
Ends with "N passed, N failed" and exits non-zero on any failure.
"""

import base64
import binascii
import glob
import re
import subprocess
import sys

import yaml

MIN_K8S, MAX_K8S = "1.30.0", "1.37.0"
TARGETS = ["deploy/kubernetes/base", "deploy/kubernetes/overlays/local", "deploy/kubernetes/overlays/full",
           "deploy/kubernetes/overlays/kind", "deploy/kubernetes/rbd", "deploy/kubernetes/cephfs"]
CRD_GROUPS = ("snapshot.storage.k8s.io", "groupsnapshot.storage.k8s.io", "monitoring.coreos.com",
              "cbt.storage.k8s.io")
RULES_FILE = "deploy/prometheus/ferrovol.rules.yaml"
SMS_CRD = "deploy/kubernetes/components/snapshot-metadata/crd.yaml"
MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"

passed, failed = 0, 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}")


def render(target):
    out = subprocess.run(["kubectl", "kustomize", target], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def of_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def validate_schemas(path, docs):
    builtin = [d for d in docs if d["apiVersion"].split("/")[0] not in CRD_GROUPS]
    if not builtin:
        return
    text = yaml.safe_dump_all(builtin)
    for version in (MIN_K8S, MAX_K8S):
        r = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", version, "-"],
            input=text, capture_output=True, text=True,
        )
        check(r.returncode == 0, f"{path} against Kubernetes {version}: {r.stdout}{r.stderr}")


def check_crds(path, docs):
    """Fields the snapshot CRDs (external-snapshotter v8) require."""
    for d in docs:
        kind, spec = d.get("kind"), d.get("spec", {})
        where = f"{path}: {kind} {d['metadata'].get('name')}"
        if kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
            check(bool(d.get("driver")), f"{where}: driver is required")
            check(d.get("deletionPolicy") in ("Delete", "Retain"), f"{where}: deletionPolicy")
        elif kind == "VolumeSnapshot":
            src = spec.get("source", {})
            check(len([k for k in ("persistentVolumeClaimName", "volumeSnapshotContentName") if k in src]) == 1,
                  f"{where}: exactly one source")
        elif kind == "VolumeSnapshotContent":
            src, ref = spec.get("source", {}), spec.get("volumeSnapshotRef", {})
            check(spec.get("driver") and spec.get("deletionPolicy") in ("Delete", "Retain"), f"{where}: driver, deletionPolicy")
            check(len([k for k in ("snapshotHandle", "volumeHandle") if k in src]) == 1, f"{where}: one source")
            check(ref.get("name") and ref.get("namespace"), f"{where}: volumeSnapshotRef name+namespace")
        elif kind == "VolumeGroupSnapshot":
            src = spec.get("source", {})
            check(len([k for k in ("selector", "volumeGroupSnapshotContentName") if k in src]) == 1,
                  f"{where}: exactly one source")


def schema_errors(value, schema, where="$"):
    """What in `value` an OpenAPI v3 schema (the subset CRDs use) refuses."""
    errors = []
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        props = schema.get("properties", {})
        errors += [f"{where}.{k}: required" for k in schema.get("required", []) if k not in value]
        if "x-kubernetes-preserve-unknown-fields" not in schema and props:
            errors += [f"{where}.{k}: unknown field" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{where}: not a string"]
        if schema.get("format") == "byte":
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                errors.append(f"{where}: not base64")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{where}: not an array"]
        for i, v in enumerate(value):
            errors += schema_errors(v, schema.get("items", {}), f"{where}[{i}]")
    return errors


def check_components(docs):
    """The optional components: monitoring and changed-block tracking."""
    (ds,) = of_kind(docs, "DaemonSet")
    (dep,) = of_kind(docs, "Deployment")
    cs = containers(dep)
    ports = {p["name"]: p["containerPort"] for c in cs.values() for p in c.get("ports", [])}
    node_ports = {p["name"] for c in containers(ds).values() for p in c.get("ports", [])}

    # Prometheus Operator objects: the rules are the shipped rules file, and
    # the PodMonitor scrapes ports the pod declares.
    (rule,) = of_kind(docs, "PrometheusRule")
    check(rule["spec"] == load(RULES_FILE)[0], f"PrometheusRule equals {RULES_FILE}")
    (pm,) = of_kind(docs, "PodMonitor")
    for w in (ds, dep):
        check(pm["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items(),
              f"PodMonitor selects the {w['kind']}'s pods")
    for ep in pm["spec"]["podMetricsEndpoints"]:
        check(ep["port"] in ports and ep["port"] in node_ports, f"PodMonitor port {ep['port']} is declared by both pods")
    check({ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]} == {"metrics", "healthz"},
          "PodMonitor scrapes the driver and the prober")

    # Changed-block tracking: the CR is valid for its CRD, names the driver,
    # and points at the Service in front of the sidecar, which talks to the
    # driver's socket under an account allowed to review tokens.
    (crd,) = load(SMS_CRD)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (sms,) = of_kind(docs, "SnapshotMetadataService")
    errors = schema_errors(sms, schema)
    check(not errors, f"SnapshotMetadataService against its CRD: {errors}")
    check(sms["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}",
          "SnapshotMetadataService apiVersion is the CRD's")
    (csidriver,) = of_kind(docs, "CSIDriver")
    check(sms["metadata"]["name"] == csidriver["metadata"]["name"], "SnapshotMetadataService is named for the driver")
    svc = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "ferrovol-snapshot-metadata"][0]
    (svc_port,) = svc["spec"]["ports"]
    check(sms["spec"]["address"] == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}:{svc_port['port']}",
          "SnapshotMetadataService address is the sidecar's Service")
    check(svc_port["targetPort"] in ports and ports[svc_port["targetPort"]] == 50051,
          "the Service targets the sidecar's port")
    check(svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
          and not svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(),
          "the snapshot metadata Service selects the controller's pods only")
    sidecar = cs.get("csi-snapshot-metadata")
    check(sidecar is not None, "the snapshot metadata sidecar runs beside the controller")
    check(arg(sidecar, "--csi-address") == arg(cs["ferrovol"], "--endpoint").removeprefix("unix://"),
          "the snapshot metadata sidecar talks to the driver's socket")
    cert_dir = arg(sidecar, "--tls-cert").rsplit("/", 1)[0]
    check("secret" in volume_at(dep, sidecar, cert_dir), "the sidecar's certificate comes from a Secret")
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    bindings = of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
    sa, ns = dep["spec"]["template"]["spec"]["serviceAccountName"], dep["metadata"]["namespace"]
    for resource, verb in [("tokenreviews", "create"), ("subjectaccessreviews", "create"),
                           ("snapshotmetadataservices", "get"), ("volumesnapshots", "get"),
                           ("volumesnapshotcontents", "get")]:
        check(grants(roles, bindings, sa, ns, resource, verb), f"csi-snapshot-metadata may {verb} {resource}")
    client = roles.get(("ClusterRole", "ferrovol-snapshot-metadata-client"), {})
    check(any("serviceaccounts/token" in r["resources"] for r in client.get("rules", [])),
          "the backup client role may mint audience tokens")


def check_no_node_deployment(docs):
    """The controller sidecars run centrally: none in node-deployment mode
    (which needs snapshot-controller flags and cannot do group snapshots),
    none in the node DaemonSet, and nothing asks the operator for the
    snapshot-controller's distributed snapshotting."""
    (ds,) = of_kind(docs, "DaemonSet")
    (dep,) = of_kind(docs, "Deployment")
    for w in (ds, dep):
        for name, c in containers(w).items():
            check(arg(c, "--node-deployment") in (None, "false"), f"{w['kind']} {name} is not a node deployment")
    for sidecar in ("csi-provisioner", "csi-snapshotter", "csi-resizer"):
        check(sidecar in containers(dep) and sidecar not in containers(ds), f"{sidecar} runs in the controller only")
        if dep["spec"].get("replicas", 1) > 1:
            check(arg(containers(dep)[sidecar], "--leader-election") == "true",
                  f"{sidecar} elects a leader among the controller replicas")
    check(arg(containers(dep)["csi-provisioner"], "--capacity-ownerref-level") == "2",
          "capacity objects are owned by the Deployment (pod -> ReplicaSet -> Deployment)")
    check("distributed" not in open("docs/kubernetes.md").read().lower(),
          "docs/kubernetes.md does not ask for distributed snapshotting")
    for path in sorted(glob.glob("examples/*.yaml")):
        for d in load(path):
            if d.get("kind") == "VolumeSnapshotContent":
                check(MANAGED_BY not in d["metadata"].get("labels", {}),
                      f"{path}: {d['metadata']['name']} needs no {MANAGED_BY} label")
    for path in sorted(glob.glob("examples/*.yaml")) + ["deploy/kubernetes/base/snapshotclasses.yaml"]:
        for d in load(path):
            if d["apiVersion"].startswith("groupsnapshot.storage.k8s.io/"):
                check(d["apiVersion"] == "groupsnapshot.storage.k8s.io/v1", f"{path}: {d['kind']} uses the v1 API")


def check_link(docs):
    """The relay and the agents find each other: the agents dial the
    headless Service in front of the controller's link port; the relay
    mounts the Secret `ferrovol link secret` makes, and each agent its own
    node's certificate from the node (no certificate all nodes share)."""
    certs_rs = open("crates/ferrovol-relay/src/certs.rs").read()
    secret_of = dict(re.findall(r'pub const (\w+)_SECRET: &str = "([^"]+)"', certs_rs))
    (ds,) = of_kind(docs, "DaemonSet")
    (dep,) = of_kind(docs, "Deployment")
    relay, agent = containers(dep)["ferrovol"], containers(ds)["ferrovol"]
    check(arg(relay, "--mode") == "relay" and arg(agent, "--mode") == "agent", "controller relays, nodes are agents")
    (svc,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "ferrovol-controller"]
    check(svc["spec"].get("clusterIP") == "None", "the link Service is headless (every replica is dialled)")
    check(svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items(),
          "the link Service selects the controller's pods")
    check(not svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(),
          "the link Service does not select the node pods")
    (port,) = svc["spec"]["ports"]
    relay_ports = {p["name"]: p["containerPort"] for p in relay.get("ports", [])}
    listen = arg(relay, "--link-listen")
    check(port["targetPort"] in relay_ports and listen.endswith(f":{relay_ports[port['targetPort']]}"),
          "the Service targets the port the relay listens on")
    ns = svc["metadata"]["namespace"]
    check(arg(agent, "--link-controller") in (f"{svc['metadata']['name']}.{ns}.svc:{port['port']}",
                                              f"{svc['metadata']['name']}.$(NAMESPACE).svc:{port['port']}"),
          "agents dial the link Service")
    check(any(e["name"] == "NAMESPACE" for e in agent.get("env", [])) or "$(NAMESPACE)" not in arg(agent, "--link-controller"),
          "the agent's $(NAMESPACE) is defined")
    want = secret_of.get("RELAY")
    check(volume_at(dep, relay, arg(relay, "--link-tls")).get("secret", {}).get("secretName") == want,
          f"the relay mounts Secret {want} at --link-tls")
    own = volume_at(ds, agent, arg(agent, "--link-tls"))
    check("hostPath" in own and "secret" not in own,
          "each agent's link certificate is its node's own (a hostPath), not a Secret all nodes share")
    check(dep["spec"]["template"]["metadata"]["labels"] != ds["spec"]["template"]["metadata"]["labels"],
          "the Deployment's and DaemonSet's pods are told apart by their labels")


def containers(ds):
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def volume_at(workload, container, path):
    """The volume `container` of `workload` mounts at `path` ({} when none)."""
    vols = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    return vols.get(mounts.get(path or "", ""), {})


def arg(container, flag):
    for a in container.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def grants(roles, bindings, sa, ns, resource, verb):
    """Whether the service account may `verb` `resource` through some binding."""
    for b in bindings:
        if not any(s.get("kind") == "ServiceAccount" and s["name"] == sa and s.get("namespace", ns) == ns
                   for s in b.get("subjects", [])):
            continue
        role = roles.get((b["roleRef"]["kind"], b["roleRef"]["name"]))
        if role and any(resource in r["resources"] and verb in r["verbs"] for r in role.get("rules", [])):
            return True
    return False


def driver_info(binary):
    """What the real driver (local engine, all services) says of itself:
    `ferrovol ctl -o json info` against `ferrovol serve` in a scratch
    directory. Asked, not parsed out of the source: the capabilities are
    the engine's and the services', assembled at run time."""
    import json
    import os
    import tempfile
    import time
    with tempfile.TemporaryDirectory(prefix="ferrovol-check-") as d:
        sock = os.path.join(d, "csi.sock")
        os.mkdir(os.path.join(d, "kubelet"))
        server = subprocess.Popen(
            [binary, "serve", "--endpoint", sock, "--state-dir", os.path.join(d, "state"),
             "--kubelet-dir", os.path.join(d, "kubelet"), "--node-id", "check-node"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                ask = subprocess.run([binary, "ctl", "--endpoint", sock, "--timeout", "5s", "-o", "json", "info"],
                                     capture_output=True, text=True)
                if ask.returncode == 0:
                    return json.loads(ask.stdout)
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    sys.exit(f"the driver did not answer `ctl info`: {ask.stderr.strip()}\n"
                             f"{server.communicate()[1][-2000:]}")
                # Exit code 3: not listening yet. Wait on the process, not a clock.
                try:
                    server.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=30)


def cross_checks(docs, binary):
    info = driver_info(binary)
    driver_default = info["name"]
    (topology_key,) = info["node"]["topology"].keys()
    controller_caps = set(info["controller_capabilities"])
    node_caps = set(info["node_capabilities"])
    plugin_caps = set(info["plugin_capabilities"])
    engine_publishes = "PUBLISH_UNPUBLISH_VOLUME" in controller_caps
    # Expansion on the node alone: the node grows the volume, the controller
    # has no part in it (the resizer runs in node-only mode).
    node_only_expansion = ("EXPAND_VOLUME" in node_caps and "EXPAND_VOLUME" not in controller_caps
                           and "VOLUME_EXPANSION_ONLINE" in plugin_caps)

    (csidriver,) = of_kind(docs, "CSIDriver")
    (ds,) = of_kind(docs, "DaemonSet")
    (dep,) = of_kind(docs, "Deployment")
    cs = containers(ds)
    ccs = containers(dep)
    drv = cs["ferrovol"]
    name = csidriver["metadata"]["name"]

    # One driver name everywhere.
    check(name == driver_default, f"CSIDriver {name} != driver default {driver_default}")
    check(arg(drv, "--driver-name") == name, "ferrovol --driver-name matches the CSIDriver")
    check(arg(ccs["ferrovol"], "--driver-name") == name, "the controller's --driver-name matches the CSIDriver")
    for sc in of_kind(docs, "StorageClass"):
        check(sc["provisioner"] == name, f"StorageClass {sc['metadata']['name']} provisioner")
    for k in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        for c in of_kind(docs, k):
            check(c["driver"] == name, f"{k} {c['metadata']['name']} driver")

    # The socket the registrar announces is where the plugin listens.
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mount_of = {c: {m["name"]: m["mountPath"] for m in cs[c].get("volumeMounts", [])} for c in cs}
    endpoint = arg(drv, "--endpoint")
    check(endpoint and endpoint.startswith("unix://"), "ferrovol listens on a unix socket")
    sock = endpoint[len("unix://"):]
    sock_dir = sock.rsplit("/", 1)[0]
    host_dir = vols["socket-dir"]["hostPath"]["path"]
    check(mount_of["ferrovol"].get("socket-dir") == sock_dir, "ferrovol's socket dir is the socket-dir volume")
    check(arg(cs["node-driver-registrar"], "--kubelet-registration-path") == host_dir + "/csi.sock",
          "registrar announces the host path of the plugin socket")
    check(host_dir == f"/var/lib/kubelet/plugins/{name}", "socket under the kubelet's plugins dir, named for the driver")
    for c in cs:
        if c != "ferrovol":
            # The sidecars' flag, or ours (ferrovol probe) with the same meaning.
            address = (arg(cs[c], "--csi-address") or arg(cs[c], "--endpoint") or "").removeprefix("unix://")
            check(address == sock and mount_of[c].get("socket-dir") == sock_dir,
                  f"{c} talks to the plugin socket")
    # The same in the controller's pod, on its own socket.
    cmount = {c: {m["name"]: m["mountPath"] for m in ccs[c].get("volumeMounts", [])} for c in ccs}
    csock = arg(ccs["ferrovol"], "--endpoint").removeprefix("unix://")
    for c in ccs:
        if c != "ferrovol":
            address = (arg(ccs[c], "--csi-address") or arg(ccs[c], "--endpoint") or "").removeprefix("unix://")
            check(address == csock and cmount[c].get("socket-dir") == csock.rsplit("/", 1)[0],
                  f"controller {c} talks to the relay's socket")

    # The driver container's flags are ones `ferrovol serve` accepts, and the
    # kubelet dir it guards is the one mounted with bidirectional propagation.
    help_text = subprocess.run([binary, "serve", "--help"], check=True, capture_output=True, text=True).stdout
    for a in drv.get("args", [])[1:] + ccs["ferrovol"].get("args", [])[1:]:
        flag = a.split("=", 1)[0]
        check(flag in help_text, f"ferrovol serve accepts {flag}")
    # The liveness container is `ferrovol probe`, serving the port the driver
    # container's probes use.
    probe_help = subprocess.run([binary, "probe", "--help"], check=True, capture_output=True, text=True).stdout
    for pod in (cs, ccs):
        prober, main = pod["liveness-probe"], pod["ferrovol"]
        check(prober["args"][0] == "probe", "liveness container runs ferrovol probe")
        for a in prober["args"][1:]:
            check(a.split("=", 1)[0] in probe_help, f"ferrovol probe accepts {a.split('=', 1)[0]}")
        health_port = [p["containerPort"] for p in main["ports"] if p["name"] == "healthz"][0]
        check(arg(prober, "--metrics-addr").endswith(f":{health_port}"), "prober serves the driver's healthz port")
        check(main["livenessProbe"]["httpGet"]["path"] == "/healthz", "driver liveness uses /healthz")
    kubelet = [m for m in drv["volumeMounts"] if m["name"] == "kubelet-dir"][0]
    check(kubelet.get("mountPropagation") == "Bidirectional", "kubelet dir mounted Bidirectional")
    check(arg(drv, "--kubelet-dir") == kubelet["mountPath"], "--kubelet-dir is the mounted kubelet dir")
    check(drv.get("securityContext", {}).get("privileged") is True, "driver container is privileged")

    # The CSIDriver object says what the driver does.
    check(csidriver["spec"]["attachRequired"] == engine_publishes,
          "attachRequired matches the engine's publish step (PUBLISH_UNPUBLISH_VOLUME)")
    check((csidriver["spec"].get("fsGroupPolicy") == "File") == ("VOLUME_MOUNT_GROUP" not in node_caps),
          "fsGroupPolicy File exactly when VOLUME_MOUNT_GROUP is not advertised")
    check(csidriver["spec"].get("storageCapacity") == (arg(ccs["csi-provisioner"], "--enable-capacity") == "true"),
          "storageCapacity matches the provisioner's --enable-capacity")
    check(node_only_expansion and "csi-resizer" in ccs,
          "expansion: node-side driver with a resizer that can run in node-only mode")
    check(arg(drv, "--engine") == "local", "the DaemonSet serves the local engine (--engine=local)")
    check(arg(ccs["ferrovol"], "--engine") == "local", "the controller relays for the local engine")

    # Each sidecar's account is bound to what that sidecar calls.
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    ns = dep["metadata"].get("namespace", "ferrovol")
    check(any(s["metadata"]["name"] == sa for s in of_kind(docs, "ServiceAccount")), f"service account {sa} exists")
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    bindings = of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
    needs = {
        "csi-provisioner": [("persistentvolumes", "create"), ("persistentvolumes", "delete"),
                            ("persistentvolumeclaims", "update"), ("storageclasses", "get"),
                            ("csistoragecapacities", "create"), ("volumesnapshotcontents", "get"),
                            ("volumesnapshots", "get"), ("volumesnapshots", "watch"), ("volumesnapshots", "update"),
                            ("csinodes", "get"), ("nodes", "get"), ("replicasets", "get"), ("leases", "update")],
        "csi-snapshotter": [("volumesnapshotcontents", "update"), ("volumesnapshotcontents", "create"), ("volumesnapshotcontents/status", "update"),
                            ("volumesnapshotclasses", "get"), ("volumegroupsnapshotcontents", "update"),
                            ("volumegroupsnapshotcontents/status", "update"), ("volumegroupsnapshotclasses", "get"),
                            ("leases", "update")],
        "csi-resizer": [("persistentvolumes", "patch"), ("persistentvolumeclaims/status", "patch"),
                        ("leases", "create"), ("leases", "update")],
    }
    for sidecar, pairs in needs.items():
        for resource, verb in pairs:
            check(grants(roles, bindings, sa, ns, resource, verb), f"{sidecar} may {verb} {resource}")

    # Topology: the key in the driver is the key the docs and examples use.
    docs_text = open("docs/kubernetes.md").read() + open("docs/architecture.md").read()
    check(topology_key in docs_text, f"docs mention the topology key {topology_key}")
    for path in glob.glob("examples/*.yaml"):
        for d in load(path):
            for term in d.get("spec", {}).get("nodeAffinity", {}).get("required", {}).get("nodeSelectorTerms", []):
                for e in term.get("matchExpressions", []):
                    check(e["key"] == topology_key, f"{path}: node affinity uses {topology_key}")

    # Every tool the node service runs is installed in the runtime image.
    exec_rs = open("crates/ferrovol-host/src/exec.rs").read()
    package_of = {}
    for progs, pkg in re.findall(r'((?:"[\w.-]+"\s*\|?\s*)+)=>\s*"([\w-]+)"', exec_rs):
        for p in re.findall(r'"([\w.-]+)"', progs):
            package_of[p] = pkg
    used = set()
    for f in glob.glob("crates/ferrovol-host/src/node/*.rs") + ["crates/ferrovol-local/src/poolinit.rs",
                                                                 "crates/ferrovol-rbd/src/mapper.rs",
                                                                 "crates/ferrovol-cephfs/src/node.rs"]:
        text = open(f).read()
        used |= set(re.findall(r'exec::(?:run(?:_status)?|spawn_detached)\(\s*"([\w.-]+)"', text))
        # A mapper's tool, passed to the shared map/unmap helpers, or looked
        # for before use (`tool("rbd-nbd")`).
        used |= set(re.findall(r'\b(?:map_with_tool|unmap_device|tool)\(\s*"([\w.-]+)"', text))
        # A helper a node half names once (`const HELPER: &str = "ceph-fuse";`).
        used |= set(re.findall(r'const HELPER: &str = "([\w.-]+)";', text))
    dockerfile = open("Dockerfile").read()
    runtime = dockerfile.split("FROM ")[-1]
    check({"rbd", "rbd-nbd", "rbd-fuse"} <= used, f"the RBD mappers' tools are found in the source: {sorted(used)}")
    check("ceph-fuse" in used, f"the CephFS node's helper is found in the source: {sorted(used)}")
    for prog in sorted(used):
        pkg = package_of.get(prog)
        check(pkg is not None, f"{prog} has a package in exec::package_for")
        check(pkg is not None and re.search(rf"\b{re.escape(pkg)}\b", runtime), f"runtime image installs {pkg} for {prog}")
    # Every Ceph library an engine loads at run time is installed too.
    ceph_rs = "".join(open(f).read() for f in glob.glob("crates/ferrovol-ceph/src/*.rs"))
    loaded = set(re.findall(r'open\("lib[\w.]+", "([\w-]+)"\)', ceph_rs))
    loaded |= set(re.findall(r'install the (lib[\w-]+) package\)', ceph_rs))
    check({"librados2", "librbd1", "libcephfs2"} <= loaded, f"the Ceph libraries loaded are found in the source: {sorted(loaded)}")
    for pkg in sorted(loaded):
        check(re.search(rf"\b{re.escape(pkg)}\b", runtime), f"runtime image installs {pkg} (loaded at run time)")
    check(re.search(r'ENTRYPOINT \["/usr/local/bin/ferrovol"\]', runtime), "image entrypoint is ferrovol")


def check_ceph_workloads(label, engine, docs, binary, name, dep, ds):
    """What every Ceph engine's base shares: the controller Deployment and
    the node DaemonSet serve the engine in their modes under the driver's
    name with flags the binary accepts, both mount the Ceph config where
    --ceph-conf points, the node is privileged with the kubelet dir
    Bidirectional, the base holds no Secret, and the node's account is
    bound to nothing."""
    ctl, node = containers(dep)["ferrovol"], containers(ds)["ferrovol"]
    check((arg(ctl, "--mode"), arg(ctl, "--engine")) == ("controller", engine),
          f"{label} controller: --mode=controller --engine={engine}")
    check((arg(node, "--mode"), arg(node, "--engine")) == ("node", engine), f"{label} node: --mode=node --engine={engine}")
    help_text = subprocess.run([binary, "serve", "--help"], check=True, capture_output=True, text=True).stdout
    for c in (ctl, node):
        check(arg(c, "--driver-name") == name, f"{label} --driver-name is {name}")
        for a in c["args"][1:]:
            check(a.split("=", 1)[0] in help_text, f"ferrovol serve accepts {a.split('=', 1)[0]} ({label})")
    # Ceph's config reaches both where --ceph-conf points.
    (cm,) = of_kind(docs, "ConfigMap")
    check("mon_host" in cm["data"].get("ceph.conf", ""), f"the {label} Ceph ConfigMap names monitors")
    for w, c in ((dep, ctl), (ds, node)):
        conf_dir, conf_file = arg(c, "--ceph-conf").rsplit("/", 1)
        vol = volume_at(w, c, conf_dir)
        check(vol.get("configMap", {}).get("name") == cm["metadata"]["name"] and conf_file in cm["data"],
              f"{label} {w['kind']} mounts the Ceph config at --ceph-conf")
    check(node.get("securityContext", {}).get("privileged") is True, f"{label} node container is privileged")
    # The fuse helpers outlive the container: started in a cgroup of the
    # host's (a hostPath of /sys/fs/cgroup), with the host's PID namespace.
    cgroup = arg(node, "--helper-cgroup") or ""
    cgroup_root = cgroup.rsplit("/", 1)[0]
    check(ds["spec"]["template"]["spec"].get("hostPID") is True,
          f"{label} node: hostPID, so the helpers do not die with the pod's PID namespace")
    check(volume_at(ds, node, cgroup_root).get("hostPath", {}).get("path") == "/sys/fs/cgroup",
          f"{label} node: --helper-cgroup ({cgroup!r}) is in the host's cgroup file system")
    kubelet = [m for m in node["volumeMounts"] if m["name"] == "kubelet-dir"][0]
    check(kubelet.get("mountPropagation") == "Bidirectional" and arg(node, "--kubelet-dir") == kubelet["mountPath"],
          f"{label} node: kubelet dir mounted Bidirectional at --kubelet-dir")
    check(not of_kind(docs, "Secret"),
          f"{label} base holds no Secret (applying it must never overwrite the operator's key)")
    bindings = of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
    node_sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    check(not any(s["name"] == node_sa for b in bindings for s in b.get("subjects", [])),
          f"{label} node account has no roles")


def check_ceph_secret(label, docs, dep):
    """The classes (storage and snapshot) name one Secret, the one the
    docs' install steps create with ceph-csi's keys, and the controller
    mounts it where --ceph-secret-dir points for its own calls (Probe,
    listings, capacity)."""
    named = set()
    for kind in ("StorageClass", "VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        for c in of_kind(docs, kind):
            named |= {(v, c["parameters"].get(k.replace("-name", "-namespace")))
                      for k, v in c.get("parameters", {}).items() if k.endswith("-secret-name")}
    check(len(named) == 1, f"{label} classes name one Secret: {named}")
    (secret_name, secret_ns), = named or {(None, None)}
    made = docs_secret_commands()
    check(any(n == secret_name and ns == secret_ns and {"userID", "userKey", "adminID", "adminKey"} <= keys
              for n, ns, keys in made),
          f"docs/kubernetes.md creates Secret {secret_ns}/{secret_name} with ceph-csi's keys: {made}")
    ctl = containers(dep)["ferrovol"]
    secret_vol = volume_at(dep, ctl, arg(ctl, "--ceph-secret-dir"))
    check(secret_vol.get("secret", {}).get("secretName") == secret_name,
          f"{label} controller: --ceph-secret-dir is the classes' Secret, mounted (Probe has a credential)")


def check_rbd(docs, binary):
    """The RBD engine's base: deployed as ceph-csi is (a controller
    Deployment with the four controller sidecars, a node DaemonSet), with a
    CSIDriver that says what the engine does, classes the engine accepts,
    and the Ceph config and secret wired to where the driver reads them."""
    lib = open("crates/ferrovol-rbd/src/lib.rs").read()
    name = re.search(r'DRIVER_NAME: &str = "([^"]+)"', lib).group(1)
    # The RBD driver needs a cluster to answer `ctl info` (this check is
    # offline): whether it publishes is read from the part its controller
    # hands out (`publishing()` answering Some).
    controller_rs = open("crates/ferrovol-rbd/src/controller.rs").read()
    publishes = re.search(r"fn publishing\(&self\) -> Option<&dyn Publishing> \{\s*Some\(self\)",
                          controller_rs) is not None
    params_rs = open("crates/ferrovol-rbd/src/params.rs").read()
    known = set(re.findall(r'^\s+"(\w+)"(?: if [^=]*)? =>', params_rs, re.M))
    (csidriver,) = of_kind(docs, "CSIDriver")
    (dep,) = of_kind(docs, "Deployment")
    (ds,) = of_kind(docs, "DaemonSet")
    ccs, ncs = containers(dep), containers(ds)
    ctl = ccs["ferrovol"]
    check(csidriver["metadata"]["name"] == name, f"RBD CSIDriver is {name}")
    check(csidriver["spec"]["attachRequired"] == publishes is True,
          "RBD attachRequired: the engine publishes (ControllerPublish records the node)")
    check(csidriver["spec"].get("storageCapacity") is False and arg(ccs["csi-provisioner"], "--enable-capacity") is None,
          "RBD: no per-node capacity objects")
    check_ceph_workloads("RBD", "rbd", docs, binary, name, dep, ds)
    for sidecar in ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"):
        check(sidecar in ccs and sidecar not in ncs, f"RBD {sidecar} runs in the controller only")
        if sidecar in ccs:
            check(arg(ccs[sidecar], "--leader-election") == "true", f"RBD {sidecar} elects a leader")
            check(arg(ccs[sidecar], "--csi-address") == arg(ctl, "--endpoint").removeprefix("unix://"),
                  f"RBD {sidecar} talks to the controller's socket")
    check(arg(ccs["csi-snapshotter"], "--feature-gates") == "CSIVolumeGroupSnapshot=true", "RBD group snapshots on")
    for w in (ds, dep):
        for cname, c in containers(w).items():
            check(arg(c, "--node-deployment") in (None, "false"), f"RBD {w['kind']} {cname} is not a node deployment")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    host_dir = vols["socket-dir"]["hostPath"]["path"]
    check(host_dir == f"/var/lib/kubelet/plugins/{name}"
          and arg(ncs["node-driver-registrar"], "--kubelet-registration-path") == host_dir + "/csi.sock",
          "RBD registrar announces the plugin socket under the kubelet's plugins dir")
    # Classes: the driver's name and parameters the engine accepts.
    for sc in of_kind(docs, "StorageClass"):
        check(sc["provisioner"] == name, f"RBD StorageClass {sc['metadata']['name']} provisioner")
        engine_keys = {k for k in sc["parameters"] if not k.startswith("csi.storage.k8s.io/")}
        check(engine_keys <= known and "pool" in engine_keys, f"RBD StorageClass parameters {engine_keys} are known: {known}")
    for kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
        for c in of_kind(docs, kind):
            check(c["driver"] == name, f"RBD {kind} driver")
    check_ceph_secret("RBD", docs, dep)
    # Host paths a plain Linux node may lack must not keep the pod from
    # starting.
    for v in ds["spec"]["template"]["spec"]["volumes"]:
        hp = v.get("hostPath")
        if hp and hp["path"] not in ("/dev", "/sys", "/sys/fs/cgroup") and not hp["path"].startswith("/var/lib/kubelet") \
                and hp.get("type") == "Directory":
            check(False, f"RBD node: hostPath {hp['path']} must not require an existing directory")
    # Each sidecar's account may do what it does.
    sa, ns = dep["spec"]["template"]["spec"]["serviceAccountName"], dep["metadata"]["namespace"]
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    bindings = of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
    for resource, verb in [("persistentvolumes", "create"), ("secrets", "get"), ("volumeattachments", "patch"),
                           ("volumeattachments/status", "patch"), ("csinodes", "get"),
                           ("volumesnapshotcontents", "create"), ("volumegroupsnapshotcontents", "update"),
                           ("persistentvolumeclaims/status", "patch"), ("leases", "update")]:
        check(grants(roles, bindings, sa, ns, resource, verb), f"RBD controller may {verb} {resource}")


def check_cephfs(docs, binary):
    """The CephFS engine's base: deployed as ceph-csi's CephFS driver is (a
    controller Deployment with the provisioner and resizer, a node
    DaemonSet), with a CSIDriver that says what the engine does (no attach
    step), classes with ceph-csi's CephFS parameters, and the Ceph config
    and secret wired to where the driver reads them."""
    name = re.search(r'DRIVER_NAME: &str = "([^"]+)"', open("crates/ferrovol-cephfs/src/lib.rs").read()).group(1)
    controller_rs = open("crates/ferrovol-cephfs/src/controller.rs").read()
    publishes = "fn publishing(" in controller_rs
    snapshots = "fn snapshots(" in controller_rs
    params_rs = open("crates/ferrovol-cephfs/src/params.rs").read()
    known = set(re.findall(r'^\s+"(\w+)" =>', params_rs, re.M))
    (csidriver,) = of_kind(docs, "CSIDriver")
    (dep,) = of_kind(docs, "Deployment")
    (ds,) = of_kind(docs, "DaemonSet")
    ccs, ncs = containers(dep), containers(ds)
    ctl, node = ccs["ferrovol"], ncs["ferrovol"]
    check(csidriver["metadata"]["name"] == name, f"CephFS CSIDriver is {name}")
    check(csidriver["spec"]["attachRequired"] is publishes is False and "csi-attacher" not in ccs,
          "CephFS attachRequired: false, no attacher (the engine has no publish step)")
    check(("csi-snapshotter" in ccs) == snapshots, "CephFS: a snapshotter exactly when the engine takes snapshots")
    check(csidriver["spec"].get("storageCapacity") is False, "CephFS: no per-node capacity objects")
    check_ceph_workloads("CephFS", "cephfs", docs, binary, name, dep, ds)
    for sidecar in ("csi-provisioner", "csi-resizer") + (("csi-snapshotter",) if snapshots else ()):
        check(sidecar in ccs and sidecar not in ncs, f"CephFS {sidecar} runs in the controller only")
        if sidecar in ccs:
            check(arg(ccs[sidecar], "--leader-election") == "true", f"CephFS {sidecar} elects a leader")
            check(arg(ccs[sidecar], "--csi-address") == arg(ctl, "--endpoint").removeprefix("unix://"),
                  f"CephFS {sidecar} talks to the controller's socket")
    state = [m for m in node["volumeMounts"] if m["mountPath"] == arg(node, "--state-dir")]
    check(state and state[0].get("mountPropagation") == "Bidirectional",
          "CephFS node: the ceph-fuse mounts under --state-dir reach the host (Bidirectional)")
    filesystems = (arg(ctl, "--cephfs-filesystems") or "").split(",")
    for sc in of_kind(docs, "StorageClass"):
        check(sc["provisioner"] == name, f"CephFS StorageClass {sc['metadata']['name']} provisioner")
        engine_keys = {k for k in sc["parameters"] if not k.startswith("csi.storage.k8s.io/")}
        check(engine_keys <= known and "fsName" in engine_keys,
              f"CephFS StorageClass parameters {engine_keys} are known: {known}")
        check(sc["parameters"].get("fsName") in filesystems,
              "CephFS StorageClass's fsName is one the controller covers (--cephfs-filesystems)")
    for c in of_kind(docs, "VolumeSnapshotClass"):
        check(c["driver"] == name, "CephFS VolumeSnapshotClass driver")
    check(bool(of_kind(docs, "VolumeSnapshotClass")) == snapshots,
          "CephFS: a VolumeSnapshotClass exactly when the engine takes snapshots")
    groups = "GroupSnapshots for CephFsEngine" in open("crates/ferrovol-cephfs/src/groups.rs").read()
    for c in of_kind(docs, "VolumeGroupSnapshotClass"):
        check(c["driver"] == name, "CephFS VolumeGroupSnapshotClass driver")
    check(bool(of_kind(docs, "VolumeGroupSnapshotClass")) == groups,
          "CephFS: a VolumeGroupSnapshotClass exactly when the engine takes group snapshots")
    check((arg(ccs["csi-snapshotter"], "--feature-gates") == "CSIVolumeGroupSnapshot=true") == groups,
          "CephFS: the snapshotter's group snapshot gate on exactly when the engine takes them")
    check_ceph_secret("CephFS", docs, dep)
    sa, ns = dep["spec"]["template"]["spec"]["serviceAccountName"], dep["metadata"]["namespace"]
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    bindings = of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
    for resource, verb in [("persistentvolumes", "create"), ("secrets", "get"),
                           ("persistentvolumeclaims/status", "patch"), ("leases", "update"),
                           ("volumesnapshotcontents", "update"), ("volumesnapshotcontents", "create"),
                           ("volumegroupsnapshotcontents", "update"),
                           ("volumegroupsnapshotcontents/status", "update"),
                           ("volumegroupsnapshotclasses", "get")]:
        check(grants(roles, bindings, sa, ns, resource, verb), f"CephFS controller may {verb} {resource}")


def docs_secret_commands():
    """(name, namespace, keys) of each `kubectl create secret generic` in
    docs/kubernetes.md: what an operator following the docs makes."""
    text = open("docs/kubernetes.md").read().replace("\\\n", " ")
    made = []
    for cmd in re.findall(r"kubectl[^\n]*create secret generic[^\n]*", text):
        words = cmd.split()
        name = words[words.index("generic") + 1]
        ns = words[words.index("-n") + 1] if "-n" in words else None
        keys = set(re.findall(r"--from-(?:literal|file)=(\w+)=", cmd))
        made.append((name, ns, keys))
    return made


def check_pool_image(docs, binary):
    """The kind overlay makes each node's pool with `pool init` before the
    agent starts, at the agent's --pool-dir, its mounts reaching the host."""
    (ds,) = [d for d in of_kind(docs, "DaemonSet") if d["metadata"]["name"] == "ferrovol-node"]
    spec = ds["spec"]["template"]["spec"]
    inits = {c["name"]: c for c in spec.get("initContainers", [])}
    check("pool-init" in inits, "kind overlay: a pool-init init container")
    init, agent = inits.get("pool-init", {"args": []}), containers(ds)["ferrovol"]
    check(init["args"][:2] == ["pool", "init"] and arg(init, "--dir") == arg(agent, "--pool-dir"),
          "pool-init makes the pool at the agent's --pool-dir")
    help_text = subprocess.run([binary, "pool", "init", "--help"], check=True, capture_output=True, text=True).stdout
    for a in init["args"][2:]:
        check(a.split("=", 1)[0] in help_text, f"ferrovol pool init accepts {a.split('=', 1)[0]}")
    own = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for m in init.get("volumeMounts", []):
        check(own.get(m["mountPath"], {}).get("name") == m["name"], f"pool-init mounts {m['mountPath']} as the agent does")
    state = [m for m in init.get("volumeMounts", []) if m["mountPath"] == arg(agent, "--state-dir")]
    check(state and state[0].get("mountPropagation") == "Bidirectional",
          "pool-init's pool mount reaches the host (Bidirectional)")
    check(init.get("securityContext", {}).get("privileged") is True, "pool-init is privileged (loop device, mount)")


def main():
    binary = sys.argv[1]
    rendered = {}
    for t in TARGETS:
        docs = render(t)
        rendered[t] = docs
        check(len(docs) > 0, f"{t} renders")
        validate_schemas(t, docs)
        check_crds(t, docs)
    for path in sorted(glob.glob("examples/*.yaml")) + [SMS_CRD]:
        docs = load(path)
        validate_schemas(path, docs)
        check_crds(path, docs)
    cross_checks(rendered["deploy/kubernetes/overlays/local"], binary)
    check_no_node_deployment(rendered["deploy/kubernetes/overlays/local"])
    check_link(rendered["deploy/kubernetes/overlays/local"])
    check_components(rendered["deploy/kubernetes/overlays/full"])
    check_rbd(rendered["deploy/kubernetes/rbd"], binary)
    check_cephfs(rendered["deploy/kubernetes/cephfs"], binary)
    check_pool_image(rendered["deploy/kubernetes/overlays/kind"], binary)
    r = subprocess.run(["promtool", "check", "rules", RULES_FILE], capture_output=True, text=True)
    check(r.returncode == 0, f"promtool check rules {RULES_FILE}: {r.stdout}{r.stderr}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
