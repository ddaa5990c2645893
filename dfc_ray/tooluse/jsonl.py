"""Tool-use tasks from a JSONL file (docs/tooluse.md has the record format): one clear line per bad record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dfc_ray.tooluse.bfcl import to_json_schema
from dfc_ray.tooluse.task import Task


def _bad(where: str, field_name: str, expected: str) -> ValueError:
    return ValueError(f"{where}: field {field_name!r} {expected}")


def _json_field(record: dict[str, Any], key: str, where: str) -> Any:
    """A field that may hold JSON or a JSON-encoded string (xLAM stores tools and answers as strings)."""
    value = record[key]
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise _bad(where, key, "is a string that is not valid JSON") from None
    return value


def _xlam_schema(params: dict[str, Any], where: str) -> dict[str, Any]:
    """xLAM's ``{param: {type, description, default}}`` as a JSON Schema object; a parameter is
    required unless it has a default or its type says ``optional``."""
    properties, required = {}, []
    for name, spec in params.items():
        if not isinstance(spec, dict):
            raise _bad(where, f"tools.parameters.{name}", "should be an object like {type, description, default}")
        properties[name] = {k: v for k, v in spec.items() if k != "type"}
        if isinstance(spec.get("type"), str):
            properties[name]["type"] = spec["type"]
            if "optional" in spec["type"].lower():
                continue
        if "default" not in spec:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat template renders."""


def check_schema(schema: Any, where: str, path: str) -> None:
    """A tool's parameter schema checked where scoring and prompt rendering read it: `properties` an
    object of schemas, `required` a list of property names, `items` a schema, `type` a name or list of
    names; the first problem raises one line naming the record and the field."""
    if not isinstance(schema, dict):
        raise _bad(where, path, "should be a JSON Schema object")
    kind = schema.get("type")
    if kind is not None and not (isinstance(kind, str) or isinstance(kind, list)
                                 and all(isinstance(k, str) for k in kind)):
        raise _bad(where, f"{path}.type", f"is {kind!r}; expected a type name or a list of them")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise _bad(where, f"{path}.properties", "should be an object of {parameter: schema}")
    for name, value in properties.items():
        check_schema(value, where, f"{path}.properties.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _bad(where, f"{path}.required", f"is {required!r}; expected a list of parameter names")
    unknown = [r for r in required if r not in properties]
    if unknown and "properties" in schema:
        raise _bad(where, f"{path}.required", f"names {unknown[0]!r}, which is not among the properties")
    items = schema.get("items")
    for i, item in enumerate(items if isinstance(items, list) else [] if items is None else [items]):
        check_schema(item, where, f"{path}.items" + (f"[{i}]" if isinstance(items, list) else ""))


def _tool(tool: Any, where: str) -> dict[str, Any]:
    """One tool in any accepted shape, as an OpenAI-style tool with a JSON Schema."""
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _bad(where, "tools", "should list objects with a string 'name' (or OpenAI-style 'function')")
    params = function.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(where, f"tools[{function['name']}].parameters", "should be an object")
    if "properties" not in params and params.get("type") not in ("object", "dict"):
        params = _xlam_schema(params, where)
    check_schema(params, where, f"tools[{function['name']}].parameters")
    inner = {"name": function["name"], "description": function.get("description", "")}
    inner["parameters"] = to_json_schema({"type": "object", **params})
    return {"type": "function", "function": inner}


def _literal(value: Any) -> Any:
    """A concrete argument as a ground-truth alternative: an object (also one inside a list) becomes
    ``{key: [value]}``, its values staying plain literals, as in BFCL's answers."""
    if isinstance(value, dict):
        return {k: [v] for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _truth_from_calls(calls: Any, tools: list[dict[str, Any]], where: str, key: str) -> list[dict[str, Any]]:
    """Concrete ``{name, arguments}`` calls as a ground truth: each given value is the only one allowed;
    schema parameters a call leaves out may be omitted or given their default."""
    if not isinstance(calls, list):
        raise _bad(where, key, "should be a list of {name, arguments} calls")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    truth = []
    for call in calls:
        args = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
            raise _bad(where, key, "should be a list of {name: str, arguments: object} calls")
        allowed = {p: [_literal(v)] for p, v in args.items()}
        for p, spec in schemas.get(call["name"], {}).get("properties", {}).items():
            if p not in args and p not in schemas[call["name"]].get("required", []):
                allowed[p] = ["", spec["default"]] if "default" in spec else [""]
        truth.append({call["name"]: allowed})
    return truth


def _check_truth(truth: Any, tools: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    names = {t["function"]["name"] for t in tools}
    shape = "should be a list of {function_name: {param: [allowed values]}}"
    if not isinstance(truth, list):
        raise _bad(where, "ground_truth", shape)
    for call in truth:
        if not (isinstance(call, dict) and len(call) == 1):
            raise _bad(where, "ground_truth", shape)
        (name, params), = call.items()
        if name not in names:
            raise _bad(where, "ground_truth", f"names {name!r}, which is not among the tools")
        if not (isinstance(params, dict) and all(isinstance(v, list) for v in params.values())):
            raise _bad(where, "ground_truth", shape)
    return truth


def _messages(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and messages
        if not (ok and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise _bad(where, "messages", "should be a non-empty list of {role, content}")
        for i, message in enumerate(messages):
            if message["role"] not in ROLES:
                raise _bad(where, f"messages[{i}].role", f"is {message['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise _bad(where, f"messages[{i}].content", f"is {message['content']!r}; expected a string")
        return messages
    if isinstance(record.get("query"), str):
        system = [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
        return system + [{"role": "user", "content": record["query"]}]
    raise _bad(where, "messages", "is missing (give 'messages' or a string 'query')")


def _task_from_record(record: Any, where: str, default_id: str) -> Task:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object per line")
    if "tools" not in record:
        raise _bad(where, "tools", "is missing")
    tools_raw = _json_field(record, "tools", where)
    if not isinstance(tools_raw, list):
        raise _bad(where, "tools", "should be a list of tools")
    tools = [_tool(t, where) for t in tools_raw]
    truth_keys = [k for k in ("ground_truth", "answers", "calls") if k in record]
    if not truth_keys:
        raise _bad(where, "ground_truth", "is missing (give 'ground_truth', or concrete 'answers'/'calls')")
    key = truth_keys[0]
    value = _json_field(record, key, where)
    truth = value if key == "ground_truth" else _truth_from_calls(value, tools, where, key)
    return Task(
        id=str(record.get("id", default_id)),
        messages=_messages(record, where),
        tools=tools,
        ground_truth=_check_truth(truth, tools, where),
        category=str(record.get("category", "jsonl")),
        meta=record.get("meta", {}) if isinstance(record.get("meta"), dict) else {},
    )


def load_jsonl(path: str | Path) -> list[Task]:
    """Tasks from a JSON-lines file, one record per line (format in docs/tooluse.md)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    tasks = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{where}: line is not valid JSON") from None
            tasks.append(_task_from_record(record, where, f"{path.stem}-{lineno}"))
    return tasks
