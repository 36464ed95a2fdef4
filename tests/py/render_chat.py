"""Renders chat templates as transformers' apply_chat_template does (its jinja2 environment,
transformers/utils/chat_template_utils.py), the reference for edgellm's renders.

stdin: {"cases": [{"template": str, "special_tokens": {name: str}, "messages": [...]}]}
stdout: a list, per case {"text": str} or {"error": str} (a TemplateError's message; any other
exception a template raises, e.g. a TypeError, as "TypeError: message").
"""
import json
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

out = []
for case in json.load(sys.stdin)["cases"]:
    try:
        template = env.from_string(case["template"])
        text = template.render(
            messages=case["messages"], tools=None, documents=None, add_generation_prompt=True, **case["special_tokens"]
        )
        out.append({"text": text})
    except jinja2.exceptions.TemplateError as e:
        out.append({"error": str(e)})
    except Exception as e:  # what jinja2 lets through from Python itself: a bad argument, a missing index
        out.append({"error": f"{type(e).__name__}: {e}"})
json.dump(out, sys.stdout, ensure_ascii=False)
