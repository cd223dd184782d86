"""Index function_app.py with the real Python worker's code (azure-functions-runtime, 3.13+).

Run by tests/test_indexing.py in its own Python 3.13 virtual environment; prints one JSON
line per function with the raw bindings the worker would report to the host, or fails
with the worker's own FunctionLoadError.
"""

import json
import sys
from pathlib import Path

from azure_functions_runtime import loader
from azure_functions_runtime.bindings.meta import load_binding_registry
from azure_functions_runtime.functions import Registry


class _Message:
    """Keyword-argument container standing in for the worker's protobuf messages."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)


class BindingInfo(_Message):
    # Direction values of the protobuf enum BindingInfo.Direction.
    undefined = 0
    out = 1
    inout = 2


class Protos:
    BindingInfo = BindingInfo
    RpcFunctionMetadata = _Message
    RpcRetryOptions = _Message


def main() -> int:
    app_file = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(app_file.parent))
    load_binding_registry()
    indexed = loader.index_function_app(str(app_file))
    metadata, _ = loader.process_indexed_function(Protos, Registry(), indexed, str(app_file.parent))
    for function in metadata:
        bindings = [json.loads(raw) for raw in function.raw_bindings]
        print(json.dumps({"name": function.name, "bindings": bindings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
