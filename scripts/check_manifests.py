"""Cross-document checks of deploy/kubernetes/*.yaml that no schema can make.

Run by scripts/check-manifests.sh with the venv's Python (PyYAML comes with
kubernetes-validate). Usage:

    check_manifests.py count FILE             print the number of YAML documents in FILE
    check_manifests.py check OUT_DIR FILE...  check the manifests; write every policy found in
                                              a ConfigMap to OUT_DIR/NAME.KEY, and the serve
                                              flags and TOLLGATE_* variables the manifests use
                                              to OUT_DIR/flags.txt and OUT_DIR/env.txt

Exit 1 with one line per problem, naming the file and the object.
"""

import os
import sys

import yaml

# What a container running tollgate must have, whatever the topology.
TOLLGATE_UID = 10001
DEFAULT_SHUTDOWN_TIMEOUT = 10


def documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def pod_spec(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    if kind == "Pod":
        return doc
    return None


def flag_values(args):
    """{flag: value} from ["serve", "--a=b", "--c", "d", ...]."""
    out = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            if "=" in a:
                k, v = a.split("=", 1)
                out[k] = v
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[a] = args[i + 1]
                i += 1
            else:
                out[a] = None
        i += 1
    return out


def main():
    if sys.argv[1] == "count":
        print(len(documents(sys.argv[2])))
        return 0
    assert sys.argv[1] == "check", sys.argv
    out_dir = sys.argv[2]
    files = sys.argv[3:]
    problems = []

    def problem(where, msg):
        problems.append(f"{where}: {msg}")

    docs = []  # (file, doc)
    for f in files:
        for d in documents(f):
            docs.append((os.path.basename(f), d))

    configmaps = {d["metadata"]["name"]: d for _, d in docs if d.get("kind") == "ConfigMap"}
    services = [(f, d) for f, d in docs if d.get("kind") == "Service"]
    workloads = [(f, d, pod_spec(d)) for f, d in docs if pod_spec(d) is not None]

    for f, d in docs:
        if d.get("kind") == "Secret":
            problem(f"{f} {name_of(d)}", "a Secret is committed: the operator creates it (kubectl create secret)")

    policies = 0
    for name, cm in configmaps.items():
        for key, value in (cm.get("data") or {}).items():
            if key.endswith(".toml"):
                with open(os.path.join(out_dir, f"{name}.{key}"), "w", encoding="utf-8") as out:
                    out.write(value)
                policies += 1
    if policies == 0:
        problem("deploy/kubernetes", "no ConfigMap holds a policy (*.toml)")

    flags_used, env_used = set(), set()
    tollgate_containers = 0
    for f, d, tpl in workloads:
        where = f"{f} {name_of(d)}"
        spec = tpl["spec"]
        labels = tpl.get("metadata", {}).get("labels", {})
        selector = d.get("spec", {}).get("selector", {}).get("matchLabels")
        if selector is not None and any(labels.get(k) != v for k, v in selector.items()):
            problem(where, f"selector {selector} does not match the pod labels {labels}")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = {c["metadata"]["name"] for c in d.get("spec", {}).get("volumeClaimTemplates", [])}
        for v in volumes.values():
            ref = (v.get("configMap") or {}).get("name")
            if ref is not None and ref not in configmaps:
                problem(where, f"volume {v['name']} mounts ConfigMap {ref}, defined in no manifest here")
        if d.get("kind") == "StatefulSet":
            svc = d["spec"].get("serviceName")
            if not any(s["metadata"]["name"] == svc and s["spec"].get("clusterIP") == "None" for _, s in services):
                problem(where, f"serviceName {svc} names no headless Service here")
        pod_sc = spec.get("securityContext", {})
        containers = spec.get("containers", []) + spec.get("initContainers", [])
        for c in containers:
            cwhere = f"{where} container {c['name']}"
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    problem(cwhere, f"mounts volume {m['name']}, which the pod does not define")
                if m.get("subPath") and (volumes.get(m["name"]) or {}).get("configMap"):
                    problem(cwhere, f"mounts ConfigMap volume {m['name']} with subPath: updates would never reach the pod")
            args = c.get("args") or []
            if not args or args[0] != "serve":
                continue
            # A tollgate container.
            tollgate_containers += 1
            env_used.update(e["name"] for e in c.get("env", []) if e["name"].startswith("TOLLGATE_"))
            flags = flag_values(args[1:])
            flags_used.update(flags)
            ports = {p["containerPort"]: p for p in c.get("ports", [])}
            listen = flags.get("--listen", "127.0.0.1:50051")
            health = flags.get("--health-listen")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if p is None:
                    problem(cwhere, f"no {probe}")
                    continue
                grpc = p.get("grpc")
                if grpc is None:
                    problem(cwhere, f"{probe} is not a native gRPC probe")
                    continue
                port = grpc["port"]
                if port not in ports:
                    problem(cwhere, f"{probe} probes port {port}, which the container does not declare")
                served = {tuple(listen.rsplit(":", 1))}
                if health:
                    served.add(tuple(health.rsplit(":", 1)))
                reachable = [h for h, pt in served if pt == str(port) and h not in ("127.0.0.1", "localhost", "[::1]")]
                if not reachable:
                    problem(cwhere, f"{probe} probes port {port}, which tollgate does not serve on the pod IP "
                                    f"(--listen {listen}, --health-listen {health})")
                if grpc.get("service", "") not in ("", "tollgate.v1.Quota"):
                    problem(cwhere, f"{probe} asks for health service {grpc.get('service')!r}")
            if c.get("restartPolicy") == "Always" and c in spec.get("initContainers", []) and "startupProbe" not in c:
                problem(cwhere, "a native sidecar without a startupProbe lets the app start before it serves")
            timeout = float(flags.get("--shutdown-timeout", DEFAULT_SHUTDOWN_TIMEOUT))
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= timeout:
                problem(cwhere, f"terminationGracePeriodSeconds {grace} is not above --shutdown-timeout {timeout}")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(part, {}):
                        problem(cwhere, f"no {part}.{r}")
            sc = c.get("securityContext", {})

            def setting(key):
                return sc.get(key, pod_sc.get(key))

            if setting("runAsNonRoot") is not True:
                problem(cwhere, "runAsNonRoot is not true")
            if setting("runAsUser") != TOLLGATE_UID:
                problem(cwhere, f"runAsUser is not {TOLLGATE_UID}")
            if sc.get("readOnlyRootFilesystem") is not True:
                problem(cwhere, "readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problem(cwhere, "allowPrivilegeEscalation is not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problem(cwhere, "capabilities do not drop ALL")
            if (setting("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problem(cwhere, "seccompProfile is not RuntimeDefault")
            if "--upstream" in flags:
                # A relay keeps no ledger.
                if "--data-dir" in flags or any(m["mountPath"] == "/var/lib/tollgate" for m in c.get("volumeMounts", [])):
                    problem(cwhere, "a relay (--upstream) is given a data directory")
            elif "--store" in flags or any(e["name"] == "TOLLGATE_STORE" for e in c.get("env", [])):
                # A ledger in PostgreSQL: no data directory, the URL (it holds a password) from a
                # Secret, strict durability, and an address the other replicas can reach.
                if "--store" in flags:
                    problem(cwhere, "--store given as an argument: the URL holds a password, take it from a Secret (TOLLGATE_STORE)")
                for e in c.get("env", []):
                    if e["name"] == "TOLLGATE_STORE" and "secretKeyRef" not in (e.get("valueFrom") or {}):
                        problem(cwhere, "TOLLGATE_STORE is not read from a Secret")
                if "--data-dir" in flags:
                    problem(cwhere, "a ledger in PostgreSQL is given a data directory")
                if flags.get("--durability") != "strict":
                    problem(cwhere, "the ledger does not run with --durability strict")
                if "--advertise" not in flags:
                    problem(cwhere, "no --advertise: followers could not reach this replica when it leads")
            else:
                data = flags.get("--data-dir")
                if data is None or not any(m["mountPath"] == data for m in c.get("volumeMounts", [])):
                    problem(cwhere, f"the ledger's --data-dir {data} is not a mounted volume")
                if data is not None and not any(m["mountPath"] == data and m["name"] in claim_templates for m in c.get("volumeMounts", [])):
                    problem(cwhere, "the ledger is not on a PersistentVolumeClaim")
                if flags.get("--durability") != "strict":
                    problem(cwhere, "the ledger does not run with --durability strict")
            policy = flags.get("--policy")
            if policy is None:
                problem(cwhere, "no --policy: the embedded default would serve, not the ConfigMap's")
            else:
                mounts = [m for m in c.get("volumeMounts", []) if policy.startswith(m["mountPath"].rstrip("/") + "/")]
                ok = any(
                    (volumes.get(m["name"]) or {}).get("configMap", {}).get("name") in configmaps
                    and os.path.basename(policy) in (configmaps[volumes[m["name"]]["configMap"]["name"]].get("data") or {})
                    for m in mounts
                )
                if not ok:
                    problem(cwhere, f"--policy {policy} is no key of a mounted ConfigMap defined here")

    if tollgate_containers == 0:
        problem("deploy/kubernetes", "no container runs `tollgate serve`")

    for f, s in services:
        where = f"{f} {name_of(s)}"
        sel = s["spec"].get("selector") or {}
        matched = [tpl for _, _, tpl in workloads
                   if sel and all(tpl.get("metadata", {}).get("labels", {}).get(k) == v for k, v in sel.items())]
        if not matched:
            problem(where, f"selector {sel} selects no pod template here")
            continue
        for port in s["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for tpl in matched:
                cs = tpl["spec"].get("containers", []) + tpl["spec"].get("initContainers", [])
                declared = [(p.get("name"), p["containerPort"]) for c in cs for p in c.get("ports", [])]
                if not any(target in (n, num) for n, num in declared):
                    problem(where, f"targetPort {target} is declared by no container of the pods it selects")

    with open(os.path.join(out_dir, "flags.txt"), "w", encoding="utf-8") as out:
        out.write("".join(f"{x}\n" for x in sorted(flags_used)))
    with open(os.path.join(out_dir, "env.txt"), "w", encoding="utf-8") as out:
        out.write("".join(f"{x}\n" for x in sorted(env_used)))

    for p in problems:
        print(f"PROBLEM {p}")
    print(f"{len(docs)} documents, {tollgate_containers} tollgate containers, {policies} policies, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
