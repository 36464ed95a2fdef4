"""Checks outputs against their JSON Schemas with Python's `jsonschema` (nobody here wrote it).

stdin: [{"schema": {...}, "text": "..."}, ...]; stdout: [{"ok": bool, "error": str|null}, ...].
"""
import json
import sys

import jsonschema


def check(case):
    try:
        value = json.loads(case["text"])
    except json.JSONDecodeError as e:
        return {"ok": False, "error": f"not JSON: {e}"}
    try:
        jsonschema.validate(value, case["schema"], cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as e:
        return {"ok": False, "error": f"does not match: {e.message}"}
    return {"ok": True, "error": None}


print(json.dumps([check(case) for case in json.load(sys.stdin)]))
