"""A small app exercising every trigger type the local host supports (tests only)."""

import json
import threading

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
CALLS: list[tuple[str, dict]] = []
_lock = threading.Lock()


def record(function: str, **detail: object) -> None:
    with _lock:
        CALLS.append((function, dict(detail)))


def calls(name: str) -> list[dict]:
    with _lock:
        return [detail for called, detail in CALLS if called == name]


@app.route(route="items/{item_id:int}", methods=["GET"])
def get_item(req: func.HttpRequest) -> func.HttpResponse:
    body = {"id": int(req.route_params["item_id"]), "q": req.params.get("q"), "url": req.url}
    return func.HttpResponse(json.dumps(body), mimetype="application/json")


@app.route(route="items/special", methods=["GET"])
def special_item(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("special")


@app.route(route="echo/{*rest}", methods=["POST", "PUT"])
def echo(req: func.HttpRequest) -> func.HttpResponse:
    headers = {"X-Rest": req.route_params.get("rest", "")}
    return func.HttpResponse(req.get_body(), status_code=201, headers=headers)


@app.route(route="boom")
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("exploded")


@app.blob_trigger(arg_name="blob", path="inbox/{folder}/{name}", connection="AzureWebJobsStorage")
def inbox_blob(blob: func.InputStream) -> None:
    data = blob.read()
    record("inbox_blob", name=blob.name, size=len(data))
    if data.startswith(b"fail"):
        raise ValueError("asked to fail")


@app.queue_trigger(arg_name="msg", queue_name="%TRIGGERS_QUEUE%", connection="AzureWebJobsStorage")
def work_queue(msg: func.QueueMessage) -> None:
    body = msg.get_body().decode()
    record("work_queue", body=body, dequeue_count=msg.dequeue_count, id=msg.id)
    if body.startswith("fail"):
        raise ValueError("asked to fail")


@app.timer_trigger(arg_name="timer", schedule="*/2 * * * * *", use_monitor=True)
def every_two_seconds(timer: func.TimerRequest) -> None:
    record("every_two_seconds", past_due=timer.past_due)


@app.timer_trigger(arg_name="timer", schedule="0 0 3 * * *", use_monitor=True)
def nightly(timer: func.TimerRequest) -> None:
    record("nightly", past_due=timer.past_due)
