"""A deliberately wrong app: the queue trigger's parameter is annotated as an HTTP request.

`azure-functions`' own indexing accepts it; the worker refuses it at load time. The
worker-indexing test uses it to show that its check really runs the worker's validation.
"""

import azure.functions as func

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="work", connection="AzureWebJobsStorage")
def mismatched(msg: func.HttpRequest) -> None:
    pass
