"""A ClientApp that does no work: echoes the arrays it got, with one metric."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": msg.content["arrays"],
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)
