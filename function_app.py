"""Switchboard function app: registers one blueprint per trigger module, nothing else."""

import azure.functions as func

from functions import (
    currents,
    http_api,
    known_profiles,
    log_export,
    privacy_api,
    privacy_erasure,
    push_api,
    push_dispatch,
    run_endings,
    segment_arrival,
    segment_chunks,
    suppressions_api,
    webhooks,
)

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(http_api.bp)
app.register_functions(segment_arrival.bp)
app.register_functions(segment_chunks.bp)
app.register_functions(known_profiles.bp)
app.register_functions(suppressions_api.bp)
app.register_functions(log_export.bp)
app.register_functions(currents.bp)
app.register_functions(push_api.bp)
app.register_functions(push_dispatch.bp)
app.register_functions(run_endings.bp)
app.register_functions(privacy_api.bp)
app.register_functions(privacy_erasure.bp)
app.register_functions(webhooks.bp)
