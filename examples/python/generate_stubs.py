"""Generates the Python gRPC stubs for tollgate from ../../proto into ./generated.

Run it once after `pip install -r requirements.txt` (and again whenever the proto changes).
The stubs are generated, not committed, so they can never drift from the proto they came from.
"""

import os
import sys

import grpc_tools
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
OUT = os.path.join(HERE, "generated")
# quota.proto imports google/protobuf/duration.proto and timestamp.proto: grpcio-tools ships
# them, and the protobuf runtime already has their Python modules.
WELL_KNOWN = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")

os.makedirs(OUT, exist_ok=True)
code = protoc.main(
    [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{WELL_KNOWN}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        os.path.join(PROTO_ROOT, "tollgate", "v1", "quota.proto"),
    ]
)
if code != 0:
    sys.exit(f"protoc failed with exit code {code}")
# The modules land in generated/tollgate/v1/ (a namespace package: no __init__.py needed) and
# import each other as `tollgate.v1.quota_pb2`, so generated/ is what goes on sys.path.
print(f"stubs written to {OUT}/tollgate/v1/")
