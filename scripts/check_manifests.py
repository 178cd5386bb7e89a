"""Cross-document checks of deploy/kubernetes/*.yaml that no schema can make.

Run by scripts/check-manifests.sh with the venv's Python (PyYAML comes with
kubernetes-validate). Usage:

    check_manifests.py count FILE             print the number of YAML documents in FILE and
                                              how many of them are of a CRD kind (two numbers)
    check_manifests.py crd FILE               check the documents of CRD kinds in FILE (cert-
                                              manager's), which kubernetes-validate has no schema
                                              for: known kinds, known and required fields, types
    check_manifests.py check OUT_DIR FILE...  check the manifests; write every policy found in
                                              a ConfigMap to OUT_DIR/NAME.KEY, and the serve
                                              flags and TOLLGATE_* variables the manifests use
                                              to OUT_DIR/flags.txt and OUT_DIR/env.txt

Exit 1 with one line per problem, naming the file and the object.
"""

import os
import re
import sys

import yaml

# What a container running tollgate must have, whatever the topology.
TOLLGATE_UID = 10001
DEFAULT_SHUTDOWN_TIMEOUT = 10

# The flags (and their variables) that name a certificate, a key or a CA file.
TLS_FILE_FLAGS = {
    "--tls-cert": "TOLLGATE_TLS_CERT",
    "--tls-key": "TOLLGATE_TLS_KEY",
    "--client-ca": "TOLLGATE_CLIENT_CA",
    "--upstream-ca": "TOLLGATE_UPSTREAM_CA",
    "--upstream-cert": "TOLLGATE_UPSTREAM_CERT",
    "--upstream-key": "TOLLGATE_UPSTREAM_KEY",
}
# The keys of a Secret of type kubernetes.io/tls as cert-manager writes it.
TLS_SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")

# Environment variables whose value is a credential: only ever from a Secret.
SECRET_ENV = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|PRIVATE_?KEY|CREDENTIAL|^TOLLGATE_STORE$")
# Credentials in clear, anywhere in a manifest's text (comments included).
LITERAL_SECRETS = [
    (re.compile(r"-----BEGIN [A-Z0-9 ]*-----"), "a PEM block (a key or certificate belongs in a Secret)"),
    (re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{16,}"), "a bearer token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), "an API key (sk-...)"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), "a GitHub token"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key"),
]
# A URL with a password in it; an all-capitals word or a $VARIABLE is a placeholder.
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@")
URL_PASSWORD_PLACEHOLDER = re.compile(r"^([A-Z_]+|\$.*)$")
# A policy line that holds a credential instead of its hash.
POLICY_SECRET = re.compile(r"^\s*(token|admin_token|password|secret|api_key)\s*=", re.MULTILINE)

# Kinds of custom resources the manifests may use, by API group: kubernetes-validate has no
# schema for them, so `crd` checks their fields here.
CRD_GROUPS = ("cert-manager.io",)


def documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def is_crd(doc):
    return str(doc.get("apiVersion", "")).split("/")[0] in CRD_GROUPS


def host_of(addr):
    return addr.rsplit(":", 1)[0] if addr else addr


def port_of(addr):
    try:
        return int(addr.rsplit(":", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def selects(selector, labels):
    """Whether a LabelSelector (matchLabels, matchExpressions) selects `labels`."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def empty_selector(selector):
    return not (selector or {}).get("matchLabels") and not (selector or {}).get("matchExpressions")


def admits(rule_ports, port, name, protocol="TCP"):
    """Whether a NetworkPolicy rule's `ports` admit `port` (number, or container port name)."""
    if not rule_ports:
        return True
    for p in rule_ports:
        if not isinstance(p, dict) or p.get("protocol", "TCP") != protocol:
            continue
        pp = p.get("port")
        if pp is None or pp == port or (name is not None and pp == name):
            return True
        if isinstance(pp, int) and p.get("endPort") and pp <= port <= p["endPort"]:
            return True
    return False


def policy_types(np):
    spec = np.get("spec") or {}
    types = spec.get("policyTypes")
    if types is None:
        types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
    return types


def literal_secrets(text):
    """(line number, what) for every credential in clear in `text`."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in LITERAL_SECRETS:
            if pattern.search(line):
                found.append((n, what))
        for m in URL_PASSWORD.finditer(line):
            if not URL_PASSWORD_PLACEHOLDER.match(m.group(1)):
                found.append((n, "a URL with a password"))
    return found


# cert-manager.io/v1, the fields these manifests may use (a subset of the CRDs' schemas: an
# unknown field is an error here, as --strict makes it for the built-in kinds).
CM_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
CM_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}
CM_CERTIFICATE_SPEC = {
    "secretName": str, "commonName": str, "literalSubject": str, "dnsNames": list, "uris": list,
    "ipAddresses": list, "emailAddresses": list, "otherNames": list, "isCA": bool, "duration": str,
    "renewBefore": str, "renewBeforePercentage": int, "privateKey": dict, "usages": list,
    "issuerRef": dict, "subject": dict, "secretTemplate": dict, "keystores": dict,
    "revisionHistoryLimit": int, "additionalOutputFormats": list, "encodeUsagesInRequest": bool,
    "nameConstraints": dict, "signatureAlgorithm": str,
}
CM_IDENTITIES = ("commonName", "literalSubject", "dnsNames", "uris", "ipAddresses", "emailAddresses", "otherNames")
CM_PRIVATE_KEY = {"rotationPolicy": ("Never", "Always"), "encoding": ("PKCS1", "PKCS8"),
                  "algorithm": ("RSA", "ECDSA", "Ed25519"), "size": int}
CM_SUBJECT = {"organizations", "countries", "organizationalUnits", "localities", "provinces",
              "streetAddresses", "postalCodes", "serialNumber"}
CM_ISSUER_TYPES = {"selfSigned": {"crlDistributionPoints"},
                   "ca": {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"},
                   "acme": None, "vault": None, "venafi": None}
CM_KINDS = ("Certificate", "Issuer", "ClusterIssuer")


def check_cert_manager(doc):
    """The problems of one cert-manager.io document, as strings."""
    out = []
    if doc.get("apiVersion") != "cert-manager.io/v1":
        return [f"apiVersion {doc.get('apiVersion')!r}: only cert-manager.io/v1 is known here"]
    kind = doc.get("kind")
    if kind not in CM_KINDS:
        return [f"kind {kind!r} is no cert-manager.io/v1 kind known here ({', '.join(CM_KINDS)})"]
    for k in doc:
        if k not in ("apiVersion", "kind", "metadata", "spec"):
            out.append(f"unknown field {k!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        out.append("metadata.name is missing")
    else:
        for k in meta:
            if k not in ("name", "namespace", "labels", "annotations"):
                out.append(f"metadata: unknown field {k!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return out + ["spec is missing or not a mapping"]
    if kind == "Certificate":
        for k, v in spec.items():
            if k not in CM_CERTIFICATE_SPEC:
                out.append(f"spec: unknown field {k!r}")
            elif not isinstance(v, CM_CERTIFICATE_SPEC[k]) or (CM_CERTIFICATE_SPEC[k] is int and isinstance(v, bool)):
                out.append(f"spec.{k}: {v!r} is not of type {CM_CERTIFICATE_SPEC[k].__name__}")
            elif isinstance(v, list) and k != "otherNames" and not all(isinstance(x, str) and x for x in v):
                out.append(f"spec.{k}: every entry must be a non-empty string")
        for k in ("secretName", "issuerRef"):
            if k not in spec:
                out.append(f"spec.{k} is required")
        if not any(spec.get(k) for k in CM_IDENTITIES):
            out.append(f"spec: names no identity (one of {', '.join(CM_IDENTITIES)})")
        for k in ("duration", "renewBefore"):
            if isinstance(spec.get(k), str) and not CM_DURATION.match(spec[k]):
                out.append(f"spec.{k}: {spec[k]!r} is not a duration such as 2160h")
        for u in spec.get("usages") or []:
            if u not in CM_USAGES:
                out.append(f"spec.usages: {u!r} is no key usage cert-manager knows")
        for k, v in (spec.get("privateKey") or {}).items() if isinstance(spec.get("privateKey"), dict) else []:
            allowed = CM_PRIVATE_KEY.get(k)
            if allowed is None:
                out.append(f"spec.privateKey: unknown field {k!r}")
            elif allowed is int:
                if not isinstance(v, int) or isinstance(v, bool):
                    out.append(f"spec.privateKey.{k}: {v!r} is not an integer")
            elif v not in allowed:
                out.append(f"spec.privateKey.{k}: {v!r} is not one of {', '.join(allowed)}")
        ref = spec.get("issuerRef")
        if isinstance(ref, dict):
            for k in ref:
                if k not in ("name", "kind", "group"):
                    out.append(f"spec.issuerRef: unknown field {k!r}")
            if not isinstance(ref.get("name"), str) or not ref.get("name"):
                out.append("spec.issuerRef.name is required")
            if ref.get("kind", "Issuer") not in ("Issuer", "ClusterIssuer") and ref.get("group", "cert-manager.io") == "cert-manager.io":
                out.append(f"spec.issuerRef.kind: {ref.get('kind')!r} is not Issuer or ClusterIssuer")
        if isinstance(spec.get("subject"), dict):
            for k in spec["subject"]:
                if k not in CM_SUBJECT:
                    out.append(f"spec.subject: unknown field {k!r}")
        if isinstance(spec.get("secretTemplate"), dict):
            for k in spec["secretTemplate"]:
                if k not in ("annotations", "labels"):
                    out.append(f"spec.secretTemplate: unknown field {k!r}")
    else:
        types = [k for k in spec if k in CM_ISSUER_TYPES]
        for k in spec:
            if k not in CM_ISSUER_TYPES:
                out.append(f"spec: unknown field {k!r}")
        if len(types) != 1:
            out.append(f"spec must name exactly one issuer type ({', '.join(CM_ISSUER_TYPES)}), not {types}")
        for t in types:
            body = spec[t]
            if body is None:
                body = {}
            if not isinstance(body, dict):
                out.append(f"spec.{t} is not a mapping")
                continue
            allowed = CM_ISSUER_TYPES[t]
            if allowed is not None:
                for k in body:
                    if k not in allowed:
                        out.append(f"spec.{t}: unknown field {k!r}")
            if t == "ca" and not isinstance(body.get("secretName"), str):
                out.append("spec.ca.secretName is required")
    return out


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
        docs = documents(sys.argv[2])
        print(len(docs), sum(1 for d in docs if is_crd(d)))
        return 0
    if sys.argv[1] == "crd":
        path = sys.argv[2]
        failed = False
        for d in documents(sys.argv[2]):
            what = f"resource {str(d.get('kind')).lower()}/{(d.get('metadata') or {}).get('name')} ({d.get('apiVersion')})"
            if not is_crd(d):
                print(f"ERROR {path}: {what} is no CRD kind: keep CRD kinds in a file of their own")
                failed = True
                continue
            errors = check_cert_manager(d)
            for e in errors:
                print(f"ERROR {path} did not validate for {what}: {e}")
            failed = failed or bool(errors)
            if not errors:
                print(f"INFO {path} passed for {what}: a CRD kind kubernetes-validate has no schema "
                      f"for, its fields checked by scripts/check_manifests.py")
        return 1 if failed else 0
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
    netpols = [(f, d) for f, d in docs if d.get("kind") == "NetworkPolicy"]
    certificates = {(d.get("spec") or {}).get("secretName"): (f, d) for f, d in docs
                    if is_crd(d) and d.get("kind") == "Certificate"}
    issuers = {d["metadata"]["name"] for _, d in docs if is_crd(d) and d.get("kind") == "Issuer"}

    for f, d in docs:
        if d.get("kind") == "Secret":
            problem(f"{f} {name_of(d)}", "a Secret is committed: the operator creates it (kubectl create secret)")

    # No credential in clear anywhere in the text, comments included.
    for path in files:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for n, what in literal_secrets(text):
            problem(f"{os.path.basename(path)} line {n}", f"{what} in clear: credentials come from Secrets only")

    policies = 0
    for name, cm in configmaps.items():
        for key, value in (cm.get("data") or {}).items():
            if re.search(r"(?i)token|password|secret|\.key$|\.pem$", key):
                problem(f"ConfigMap/{name}", f"key {key!r} looks like a credential: a ConfigMap is no secret")
            if key.endswith(".toml") and POLICY_SECRET.search(value or ""):
                problem(f"ConfigMap/{name} {key}", "a token or password in clear in the policy: give its token_sha256 "
                                                   "(tollgate hash-token), keep the token in a Secret")
            if key.endswith(".toml"):
                with open(os.path.join(out_dir, f"{name}.{key}"), "w", encoding="utf-8") as out:
                    out.write(value)
                policies += 1
    if policies == 0:
        problem("deploy/kubernetes", "no ConfigMap holds a policy (*.toml)")

    flags_used, env_used = set(), set()
    tollgate_containers = 0
    tls_secrets = []  # (where, Secret name, flag naming one of its files)
    exposed = []  # tollgate containers serving gRPC on the pod IP, with their pods' labels and ports
    servers = []  # (where, pod labels, Secret of --tls-cert)
    dials = []  # (where, Service name dialed, name the certificate must carry)
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
            for e in c.get("env", []):
                if SECRET_ENV.search(e["name"]) and "secretKeyRef" not in (e.get("valueFrom") or {}):
                    problem(cwhere, f"{e['name']} is not read from a Secret (secretKeyRef): a credential in clear")
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
                # Always the plaintext health port: the kubelet's gRPC probe speaks no TLS, and
                # the gRPC port of a tollgate reachable on the pod IP is TLS.
                if health is None:
                    problem(cwhere, f"{probe} probes port {port}, but there is no --health-listen: probes go to "
                                    "the plaintext health port, since the kubelet's gRPC probe speaks no TLS")
                elif port != port_of(health):
                    problem(cwhere, f"{probe} probes port {port}, not the --health-listen port {port_of(health)}: "
                                    "the kubelet's gRPC probe speaks no TLS")

            if "--admin-token" in flags:
                problem(cwhere, "--admin-token given as an argument: the token would be in the pod spec; "
                                "take TOLLGATE_ADMIN_TOKEN from a Secret")
            env_literal = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}

            # Certificates, keys and CAs: files of a Secret mounted read-only as a directory.
            tls_files = {}
            for flag, var in TLS_FILE_FLAGS.items():
                value = flags.get(flag, env_literal.get(var))
                if value is not None:
                    tls_files[flag] = value
            for flag, path in tls_files.items():
                mounts = [m for m in c.get("volumeMounts", [])
                          if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
                if not mounts:
                    problem(cwhere, f"{flag} {path} is on no mounted volume")
                    continue
                m = max(mounts, key=lambda m: len(m["mountPath"]))
                vol = volumes.get(m["name"]) or {}
                secret = vol.get("secret")
                if m.get("subPath") or m.get("subPathExpr"):
                    problem(cwhere, f"{flag} {path}: volume {m['name']} is mounted with subPath, a copy made at "
                                    "start that the kubelet never updates: a renewed certificate would never "
                                    "reach the pod (mount the Secret as a directory)")
                if secret is None:
                    problem(cwhere, f"{flag} {path}: volume {m['name']} is not a Secret (certificates and keys "
                                    "come from Secrets)")
                    continue
                if m.get("readOnly") is not True:
                    problem(cwhere, f"{flag} {path}: Secret volume {m['name']} is not mounted readOnly")
                if secret.get("optional"):
                    problem(cwhere, f"{flag} {path}: Secret {secret.get('secretName')} is optional: the pod "
                                    "would start without it")
                if not m.get("subPath"):
                    key = path[len(m["mountPath"].rstrip("/")) + 1:]
                    items = secret.get("items")
                    keys = [i["path"] for i in items] if items else list(TLS_SECRET_KEYS)
                    if key not in keys:
                        problem(cwhere, f"{flag} {path}: {key!r} is no key of Secret {secret.get('secretName')} "
                                        f"({', '.join(keys)})")
                tls_secrets.append((cwhere, secret.get("secretName"), flag))

            on_pod_ip = host_of(listen) not in LOOPBACK
            if on_pod_ip:
                for flag in ("--tls-cert", "--tls-key"):
                    if flag not in tls_files:
                        problem(cwhere, f"serves gRPC on the pod IP (--listen {listen}) without {flag}: in plaintext")
                if "--client-ca" not in tls_files:
                    problem(cwhere, "serves gRPC on the pod IP without --client-ca: any pod the NetworkPolicy "
                                    "admits could call without a client certificate")
                names = {p.get("containerPort"): p.get("name") for p in c.get("ports", [])}
                metrics = flags.get("--metrics-listen")
                exposed.append({
                    "where": cwhere, "labels": labels, "store": "--store" in flags or "TOLLGATE_STORE" in
                    {e["name"] for e in c.get("env", [])},
                    "grpc": (port_of(listen), names.get(port_of(listen))),
                    "health": (port_of(health), names.get(port_of(health))) if health else None,
                    "metrics": (port_of(metrics), names.get(port_of(metrics))) if metrics else None,
                })
            if "--tls-cert" in tls_files:
                servers.append((cwhere, labels, dict((f2, s2) for w2, s2, f2 in tls_secrets if w2 == cwhere).get("--tls-cert")))

            # Dialing out: the upstream of a relay, the leader of a follower.
            upstream = flags.get("--upstream", env_literal.get("TOLLGATE_UPSTREAM"))
            server_name = flags.get("--upstream-server-name", env_literal.get("TOLLGATE_UPSTREAM_SERVER_NAME"))
            if upstream:
                scheme, _, rest = upstream.partition("://")
                uhost = host_of(rest.split("/")[0])
                if scheme != "https" and uhost not in LOOPBACK:
                    problem(cwhere, f"--upstream {upstream} is plaintext: dial https:// with --upstream-ca")
                if scheme == "https" and "--upstream-ca" not in tls_files:
                    problem(cwhere, f"--upstream {upstream} without --upstream-ca: its certificate could not be checked")
                if scheme == "https":
                    dials.append((cwhere, uhost.split(".")[0], server_name or uhost))
            elif ("--store" in flags or "TOLLGATE_STORE" in {e["name"] for e in c.get("env", [])}) and "--tls-cert" in tls_files:
                # A follower dials the leader's TLS port at its pod IP.
                if "--upstream-ca" not in tls_files:
                    problem(cwhere, "TLS on --listen but no --upstream-ca: followers would dial the leader in plaintext")
                if not server_name:
                    problem(cwhere, "no --upstream-server-name: followers dial the leader's pod IP, which no "
                                    "certificate names")
                if "--client-ca" in tls_files and not {"--upstream-cert", "--upstream-key"} <= set(tls_files):
                    problem(cwhere, "the leader requires client certificates (--client-ca), but followers present "
                                    "none (--upstream-cert, --upstream-key)")
                if str(flags.get("--advertise", "")).startswith("http://"):
                    problem(cwhere, f"--advertise {flags['--advertise']} is plaintext, but --listen is TLS")
                if server_name:
                    svc = [sv for _, sv in services if sv["metadata"]["name"] == server_name.split(".")[0]
                           and sv["spec"].get("clusterIP") != "None" and selects({"matchLabels": sv["spec"].get("selector")}, labels)]
                    if not svc:
                        problem(cwhere, f"--upstream-server-name {server_name} is not the DNS name of a Service "
                                        "selecting these pods")
                    own = dict((f2, s2) for w2, s2, f2 in tls_secrets if w2 == cwhere).get("--tls-cert")
                    dials.append((cwhere, None, (server_name, own)))
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

    # Every tollgate reachable on the pod IP has a NetworkPolicy: the gRPC port only from
    # selected pods; the health port open (probes); metrics not from everyone; a replica's egress
    # (if restricted) still reaches DNS and the other replicas.
    for e in exposed:
        where, labels = e["where"], e["labels"]
        selecting = [np for _, np in netpols if selects((np.get("spec") or {}).get("podSelector"), labels)]
        if not selecting:
            problem(where, "no NetworkPolicy selects its pods: any pod in the cluster can reach its gRPC port")
            continue
        ingress = [np for np in selecting if "Ingress" in policy_types(np)]
        if not ingress:
            problem(where, "no NetworkPolicy of its pods restricts Ingress")
            continue
        rules = [r for np in ingress for r in (np["spec"].get("ingress") or [])]
        port, pname = e["grpc"]
        grpc_rules = [r for r in rules if admits(r.get("ports"), port, pname)]
        if not grpc_rules:
            problem(where, f"no NetworkPolicy rule admits the gRPC port {port}: no client could call")
        for r in grpc_rules:
            if not r.get("from"):
                problem(where, f"a NetworkPolicy rule admits the gRPC port {port} from every source: admit only "
                               "pods labelled as clients (tollgate.io/client: \"true\")")
                continue
            for peer in r["from"]:
                if "ipBlock" in peer:
                    problem(where, f"a NetworkPolicy rule admits the gRPC port {port} from an ipBlock: admit pods "
                                   "by label")
                elif empty_selector(peer.get("podSelector")):
                    problem(where, f"a NetworkPolicy rule admits the gRPC port {port} from every pod of "
                                   f"{'the namespaces it selects' if 'namespaceSelector' in peer else 'the namespace'}")
        if e["health"] and not any(admits(r.get("ports"), *e["health"]) for r in rules):
            problem(where, f"no NetworkPolicy rule admits the health port {e['health'][0]}: on a CNI that filters "
                           "the kubelet's traffic, every probe would fail")
        if e["metrics"]:
            for r in rules:
                if admits(r.get("ports"), *e["metrics"]) and not r.get("from"):
                    problem(where, f"a NetworkPolicy rule admits the metrics port {e['metrics'][0]} from every "
                                   "source: admit the monitoring namespace")
        egress = [np for np in selecting if "Egress" in policy_types(np)]
        if e["store"] and egress:
            erules = [r for np in egress for r in (np["spec"].get("egress") or [])]
            if not any(admits(r.get("ports"), 53, None, "UDP") for r in erules):
                problem(where, "egress is restricted but no rule admits DNS (UDP 53)")
            if not any(admits(r.get("ports"), port, pname) and (
                    not r.get("to") or any(selects(p.get("podSelector"), labels) and "namespaceSelector" not in p
                                           for p in r["to"])) for r in erules):
                problem(where, f"egress is restricted but no rule admits the other replicas' gRPC port {port}: "
                               "followers could not reach the leader")

    # The certificates the manifests mount, when a Certificate (cert-manager) makes them: the
    # Secret each names, its usages, and the DNS names clients check it against.
    if certificates:
        for _, c in certificates.values():
            ref = (c.get("spec") or {}).get("issuerRef") or {}
            if ref.get("kind", "Issuer") == "Issuer" and ref.get("name") not in issuers:
                problem(f"Certificate/{c['metadata']['name']}", f"issuerRef names Issuer {ref.get('name')}, defined in no manifest here")

        def cert_of(secret):
            return (certificates.get(secret) or (None, None))[1]

        for where, secret, flag in tls_secrets:
            cert = cert_of(secret)
            if cert is None:
                problem(where, f"{flag} is from Secret {secret}, which no Certificate here makes")
                continue
            usages = cert["spec"].get("usages") or []
            need = {"--tls-cert": "server auth", "--upstream-cert": "client auth"}.get(flag)
            if need and need not in usages:
                problem(where, f"{flag} is from Secret {secret}, whose Certificate lacks the usage {need!r}")
        for where, labels, secret in servers:
            cert = cert_of(secret)
            if cert is None:
                continue
            for _, sv in services:
                if sv["spec"].get("clusterIP") == "None" or not sv["spec"].get("selector"):
                    continue
                if selects({"matchLabels": sv["spec"]["selector"]}, labels) and sv["metadata"]["name"] not in (cert["spec"].get("dnsNames") or []):
                    problem(where, f"Service {sv['metadata']['name']} reaches it, but its Certificate "
                                   f"{cert['metadata']['name']} does not carry that name")
        for where, svc_name, name in dials:
            if svc_name is None:
                # A follower: the leader's certificate is its own.
                name, secret = name
                targets = [secret]
            else:
                targets = []
                for _, sv in services:
                    if sv["metadata"]["name"] != svc_name:
                        continue
                    for w2, labels2, secret2 in servers:
                        if selects({"matchLabels": sv["spec"].get("selector")}, labels2):
                            targets.append(secret2)
                if not targets:
                    problem(where, f"--upstream names Service {svc_name}, which selects no TLS tollgate here")
            for secret in targets:
                cert = cert_of(secret)
                if cert is not None and name not in (cert["spec"].get("dnsNames") or []):
                    problem(where, f"checks the upstream's certificate against {name!r}, which Certificate "
                                   f"{cert['metadata']['name']} (Secret {secret}) does not carry")

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
