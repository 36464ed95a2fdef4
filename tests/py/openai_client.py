"""Drives `edgellm serve` with the official `openai` Python client (nobody here wrote it).

stdin: {"socket": PATH, "calls": [CALL, ...]}; stdout: one result per call, as JSON.
A CALL is {"kind": "chat"|"completion"|"models"|"disconnect", "args": {...}, "stream": bool}.
A call that the server refuses gives {"status": HTTP status, "error": the body's `error`}.
"""
import json
import sys

import httpx2
import openai


def main():
    spec = json.load(sys.stdin)
    client = openai.OpenAI(
        api_key="unused",  # the socket's mode is the access control
        base_url="http://localhost/v1",
        http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=spec["socket"]), timeout=600),
        max_retries=0,
    )
    print(json.dumps([run(client, call) for call in spec["calls"]]))


def run(client, call):
    kind, args, stream = call["kind"], call.get("args", {}), call.get("stream", False)
    try:
        if kind == "models":
            return {"ids": [m.id for m in client.models.list().data]}
        if kind == "model":
            return {"id": client.models.retrieve(args["id"]).id}
        if kind == "chat" and not stream:
            r = client.chat.completions.create(**args)
            return {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                    "usage": r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}), "id": r.id}
        if kind == "chat":
            text, reason, usage, chunks = "", None, None, 0
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
                chunks += 1
                if chunk.usage:
                    usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    reason = choice.finish_reason or reason
            return {"text": text, "finish_reason": reason, "usage": usage, "chunks": chunks}
        if kind == "completion" and not stream:
            r = client.completions.create(**args)
            return {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                    "usage": r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})}
        if kind == "completion":
            text, reason = "", None
            for chunk in client.completions.create(stream=True, **args):
                for choice in chunk.choices:
                    text += choice.text
                    reason = choice.finish_reason or reason
            return {"text": text, "finish_reason": reason}
        if kind == "disconnect":
            # Read a few chunks of a long stream, then hang up.
            stream = client.completions.create(stream=True, **args)
            seen = 0
            for _ in stream:
                seen += 1
                if seen == call["after_chunks"]:
                    break
            stream.close()
            return {"chunks": seen}
        raise ValueError(f"unknown call kind {kind}")
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {"raw": str(e.body)}
        return {"status": e.status_code, "error": body.get("error", body)}
    except openai.APIError as e:
        # An error inside a stream (no HTTP status of its own).
        return {"stream_error": str(e.message)}


if __name__ == "__main__":
    main()
