"""What the host will see when it indexes function_app.py."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devhost.app import load_functions

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_VERSION = "azure-functions-runtime==1.3.0"
EXPECTED = {
    "health": ("httpTrigger", {"route": "health", "methods": ["GET"], "authLevel": "ANONYMOUS"}),
    "list_runs": ("httpTrigger", {"route": "runs", "methods": ["GET"], "authLevel": "FUNCTION"}),
    "get_run": (
        "httpTrigger",
        {"route": "runs/{run_id}", "methods": ["GET"], "authLevel": "FUNCTION"},
    ),
    "segment_file_arrived": (
        "blobTrigger",
        {"path": "segments/{sync_id}/{name}", "connection": "AzureWebJobsStorage"},
    ),
    "profile_export_arrived": (
        "blobTrigger",
        {"path": "known-profiles/{registry}/{name}", "connection": "AzureWebJobsStorage"},
    ),
    "change_suppression": (
        "httpTrigger",
        {"route": "suppressions", "methods": ["POST", "DELETE"], "authLevel": "FUNCTION"},
    ),
    "lookup_suppression": (
        "httpTrigger",
        {"route": "suppressions/lookup", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "segment_chunk": (
        "queueTrigger",
        {"queueName": "segment-chunks", "connection": "AzureWebJobsStorage"},
    ),
    "log_export_timer": (
        "timerTrigger",
        {"schedule": "0 0 */4 * * *", "useMonitor": True, "runOnStartup": False},
    ),
    "run_log_export_now": (
        "httpTrigger",
        {"route": "log-export/run", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "register_push_token": (
        "httpTrigger",
        {"route": "push/tokens", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "record_push_events": (
        "httpTrigger",
        {"route": "push/events", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "send_push": (
        "httpTrigger",
        {"route": "push/send", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "get_push_dispatch": (
        "httpTrigger",
        {"route": "push/dispatches/{dispatch_id}", "methods": ["GET"], "authLevel": "FUNCTION"},
    ),
    "plan_push_dispatch": ("queueTrigger", {"queueName": "push-plans"}),
    "send_push_chunk": ("queueTrigger", {"queueName": "push-chunks"}),
    "currents_timer": (
        "timerTrigger",
        {"schedule": "0 */5 * * * *", "useMonitor": True, "runOnStartup": False},
    ),
    "currents_file": (
        "queueTrigger",
        {"queueName": "currents-files", "connection": "AzureWebJobsStorage"},
    ),
    "segment_manifest_wait": ("queueTrigger", {"queueName": "segment-manifests"}),
    "retry_failed_run": (
        "httpTrigger",
        {"route": "runs/{run_id}/retry", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "retry_run": ("queueTrigger", {"queueName": "run-retries"}),
    "erasure": (
        "httpTrigger",
        {"route": "privacy/erasure", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "privacy_erasure": ("queueTrigger", {"queueName": "privacy-erasures"}),
    "audit_lookup": (
        "httpTrigger",
        {"route": "audit/lookup", "methods": ["POST"], "authLevel": "FUNCTION"},
    ),
    "webhook": (
        "httpTrigger",
        {"route": "webhooks/{provider}", "methods": ["POST"], "authLevel": "ANONYMOUS"},
    ),
    "webhook_delivery": ("queueTrigger", {"queueName": "webhook-deliveries"}),
    "webhook_batches": (
        "timerTrigger",
        {"schedule": "*/5 * * * * *", "useMonitor": False, "runOnStartup": False},
    ),
    "run_sweeper": (
        "timerTrigger",
        {"schedule": "0 */15 * * * *", "useMonitor": True, "runOnStartup": False},
    ),
    **{
        f"poison_{name.replace('-', '_')}": ("queueTrigger", {"queueName": f"{name}-poison"})
        for name in (
            "segment-chunks",
            "segment-manifests",
            "currents-files",
            "push-plans",
            "push-chunks",
            "run-retries",
            "privacy-erasures",
            "webhook-deliveries",
        )
    },
    "poison_webjobs_blobtrigger": (
        "queueTrigger",
        {"queueName": "webjobs-blobtrigger-poison", "connection": "AzureWebJobsStorage"},
    ),
}


def trigger_of(bindings: list[dict]) -> dict:
    return next(b for b in bindings if b["type"].endswith("Trigger"))


def test_every_function_has_the_expected_trigger() -> None:
    _, functions = load_functions(ROOT / "function_app.py")
    assert {f.name for f in functions} == set(EXPECTED)
    for function in functions:
        kind, fields = EXPECTED[function.name]
        assert function.trigger_type == kind
        for key, value in fields.items():
            assert function.trigger[key] == value, (function.name, key)
        http_out = [b for b in function.bindings if b["type"] == "http"]
        assert bool(http_out) == (kind == "httpTrigger")


def test_function_app_only_registers_blueprints() -> None:
    tree = ast.parse((ROOT / "function_app.py").read_text())
    body = [n for n in tree.body if not isinstance(n, ast.Import | ast.ImportFrom)]
    docstring, create, *registrations = body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    assert ast.unparse(create).startswith("app = func.FunctionApp(")
    assert registrations
    for statement in registrations:
        text = ast.unparse(statement)
        assert text.startswith("app.register_functions(") and text.endswith(".bp)"), text


def _python313() -> str | None:
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(pyenv_root.glob("versions/3.13*/bin/python3.13"))
    if candidates:
        return str(candidates[-1])
    found = shutil.which("python3.13")
    # A pyenv shim without that version selected only prints an error.
    return found if found and "/shims/" not in found else None


def _runtime_venv(python: str) -> Path:
    """A 3.13 venv with the app's requirements and the worker; rebuilt when they change."""
    venv = ROOT / ".venv313"
    requirements = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "azure-functions=="))
    ]
    wanted = hashlib.sha256("\n".join([*requirements, RUNTIME_VERSION]).encode()).hexdigest()
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", *requirements, RUNTIME_VERSION],
        check=True,
    )  # fmt: skip
    stamp.write_text(wanted)
    return venv


def _index_with_worker(app_file: Path) -> subprocess.CompletedProcess[str]:
    python = _python313()
    if python is None:
        pytest.skip("Python 3.13 not found: the worker-indexing check needs it")
    venv = _runtime_venv(python)
    return subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "tests/worker/index_with_runtime.py"),
         str(app_file)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "AzureWebJobsStorage": "UseDevelopmentStorage=true"},
    )  # fmt: skip


@pytest.mark.skipif(sys.platform != "linux", reason="uses pyenv's Python 3.13 on Linux")
def test_python_worker_indexes_the_app_like_the_library() -> None:
    result = _index_with_worker(ROOT / "function_app.py")
    assert result.returncode == 0, result.stderr
    reported = {
        item["name"]: item["bindings"] for item in map(json.loads, result.stdout.splitlines())
    }
    _, functions = load_functions(ROOT / "function_app.py")
    for function in functions:
        worker_bindings = [
            {k: v for k, v in b.items() if k != "properties"} for b in reported[function.name]
        ]
        assert worker_bindings == function.bindings
    blob = trigger_of(reported["segment_file_arrived"])
    # SDK-type binding: the worker streams through a BlobClient instead of loading bytes.
    assert blob["properties"] == {"SupportsDeferredBinding": True}


@pytest.mark.skipif(sys.platform != "linux", reason="uses pyenv's Python 3.13 on Linux")
def test_worker_check_rejects_a_mismatched_binding() -> None:
    result = _index_with_worker(ROOT / "tests/apps/broken/function_app.py")
    assert result.returncode != 0
    assert "FunctionLoadError" in result.stderr and "mismatched" in result.stderr
