"""What ``/openapi.json`` (and ``/docs``) says: statuses, media types, and the served model's limits.

Route decorators take the ``*_DOC`` dicts (``responses=`` with every status a route returns and
every media type it speaks: JSON, ``image/*``, ``text/event-stream`` with one schema per event,
Prometheus text). :func:`install_openapi` makes the schema state the constraints that depend on
the checkpoint (sizes, steps, guidance, images per request, prompt length) once a worker has
reported them, so a request valid per the schema is one the server accepts. One limit cannot be
written in JSON Schema: the prompt's length in *tokens* (``GET /info`` ``limits.max_prompt_tokens``),
checked by the worker; it is stated in the fields' descriptions and in the 422 (OpenAI: 400) each generation
operation declares for it (``TOKEN_LIMIT_NOTE``).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
                "field": {"type": "string"},
                "allowed": {},
            },
        }
    },
}
# the one limit JSON Schema cannot state: declared in the operations' 422 / 400 and the fields' descriptions
TOKEN_LIMIT_NOTE = ("prompt or negative_prompt is over limits.max_prompt_tokens tokens (GET /info; the worker counts "
                    "them): code invalid_request, param prompt or negative_prompt, message '<field> is N tokens long; "
                    "at most M tokens are allowed'")
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}


def _error(description: str, headers: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    if headers:
        doc["headers"] = RETRY_AFTER
    return doc


def _sse(events: list[str]) -> dict[str, Any]:
    """One schema per server-sent event (OpenAPI 3.1 reads ``schema`` of an event stream per event)."""
    return {
        "schema": {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"enum": events},
                "data": {"type": "string", "contentMediaType": "application/json"},
            },
        }
    }


GENERATE_EVENTS = ["queued", "started", "progress", "preview", "completed", "error", "requeued"]  # requeued: Redis
OPENAI_EVENTS = ["image_generation.partial_image", "image_generation.completed", "error"]

IMAGE_ITEM = {
    "type": "object",
    "required": ["b64_json"],
    "properties": {"b64_json": {"type": "string"}, "tokens": {"type": "string"}},
}
GENERATE_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["seed", "width", "height", "images", "timings"],
    "properties": {
        "seed": {"type": "integer"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "images": {"type": "array", "items": IMAGE_ITEM},
        "timings": {"type": "object"},
        "token_shape": {"type": ["array", "null"], "items": {"type": "integer"}},
    },
}
JOB_STATUS = ["queued", "running", "succeeded", "failed", "cancelled"]
JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status", "status_url", "events_url"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "job"},
        "status": {"enum": JOB_STATUS},
        "created_at": {"type": "integer"},
        "finished_at": {"type": ["integer", "null"]},
        "position": {"type": ["integer", "null"], "description": "Place in the queue (0 = next) while queued"},
        "progress": {"type": ["object", "null"]},
        "preview": {"type": ["object", "null"], "description": "The newest preview (with ?preview=true)"},
        "result": GENERATE_RESULT,
        "error": {"type": "object"},
        "status_url": {"type": "string"},
        "events_url": {"type": "string"},
        "deleted": {"type": "boolean"},
    },
}
COMMON_ERRORS = {
    401: _error("Missing or wrong API key (when the server has one)"),
    413: _error("Request body over the limit"),
    422: _error("Invalid parameters (the body names the field and what is allowed). Also the answer to a "
                f"schema-valid body whose {TOKEN_LIMIT_NOTE}"),
    429: _error("Queue full: retry after Retry-After seconds", headers=True),
    503: _error(
        "No worker ready, shutting down, the worker died / hung mid-request, or (several replicas) the shared "
        "queue is unreachable: queue_unavailable",
        headers=True,
    ),
    504: _error("The request passed its deadline"),
}

GENERATE_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "description": "The images (JSON), one raw image (Accept: image/*), or an event stream",
            "content": {
                "application/json": {"schema": GENERATE_RESULT},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/webp": {"schema": {"type": "string", "format": "binary"}},
                "text/event-stream": _sse(GENERATE_EVENTS),
            },
            "headers": {"X-Request-ID": {"description": "The request's id", "schema": {"type": "string"}}},
        },
        **COMMON_ERRORS,
    }
}
OPENAI_ERRORS = {
    400: _error(f"Invalid parameters (OpenAI error shape). Also the answer to a schema-valid body whose "
                f"{TOKEN_LIMIT_NOTE}"),
    401: _error("Missing or wrong API key (OpenAI error shape)"),
    404: _error("Unknown model (model_not_found)"),
    413: _error("Request body over the limit"),
    429: _error("Queue full", headers=True),
    503: _error("No worker ready or the worker failed", headers=True),
    504: _error("The request passed its deadline"),
}
OPENAI_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "description": "ImagesResponse, or image_generation.* events when stream is true",
            "content": {
                "application/json": {"schema": {"type": "object", "required": ["created", "data"]}},
                "text/event-stream": _sse(OPENAI_EVENTS),
            },
        },
        **OPENAI_ERRORS,
    }
}
JOB_CREATE_DOC: dict[str, Any] = {
    "status_code": 202,
    "responses": {
        202: {
            "description": "Accepted: poll status_url, stream events_url",
            "content": {"application/json": {"schema": JOB_SCHEMA}},
            "headers": {"Location": {"description": "status_url", "schema": {"type": "string"}}},
            "links": {
                "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
                "JobEvents": {"operationId": "job_events", "parameters": {"job_id": "$response.body#/id"}},
                "DeleteJob": {"operationId": "delete_job", "parameters": {"job_id": "$response.body#/id"}},
            },
        },
        **COMMON_ERRORS,
    },
}
_JOB_GONE = {
    404: _error("No such job"),
    410: _error("The job's result was evicted (TTL, count or byte cap) or the job was deleted"),
    503: _error("Several replicas: the shared queue (Redis) is unreachable (queue_unavailable)", headers=True),
}
JOB_GET_DOC: dict[str, Any] = {
    "responses": {200: {"description": "The job", "content": {"application/json": {"schema": JOB_SCHEMA}}}, **_JOB_GONE}
}
JOB_EVENTS_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "description": "The job's /generate events from the start",
            "content": {"text/event-stream": _sse(GENERATE_EVENTS)},
        },
        **_JOB_GONE,
    }
}
JOB_DELETE_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "description": "Cancelled if it still ran (rows freed at the next engine step) and deleted",
            "content": {"application/json": {"schema": JOB_SCHEMA}},
        },
        **_JOB_GONE,
    }
}
METRICS_DOC: dict[str, Any] = {
    "responses": {
        200: {
            "description": "Prometheus text exposition",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


READYZ_DOC: dict[str, Any] = {
    "responses": {200: _json("A worker is ready"), 503: _json("No worker ready (starting, restarting, draining)")}
}
INFO_DOC: dict[str, Any] = {"responses": {200: _json("The served model"), 503: _error("No worker ready yet", True)}}
MODELS_DOC: dict[str, Any] = {
    "responses": {200: _json("The served model (OpenAI list shape)"), 503: _error("No worker ready yet", True)}
}
MODEL_DOC: dict[str, Any] = {
    "responses": {
        200: _json("The served model, or one of its aliases (OpenAI model object)"),
        404: _error("Not the served model nor an alias"),
        503: _error("No worker ready yet", True),
    }
}


# ---- the served model's limits in the schema -------------------------------------------------
def _set_limits(props: dict[str, Any], info: dict[str, Any], n_field: str) -> None:
    lim = info["limits"]
    chars = int(lim.get("max_prompt_chars", 10_000))
    tokens = lim.get("max_prompt_tokens")
    for name in ("prompt", "negative_prompt"):
        target = _string_schema(props.get(name))
        if target is not None:
            target["maxLength"] = chars
            if tokens:
                props[name]["description"] = (
                    (props[name].get("description") or "")
                    + f" At most {chars} characters and {tokens} tokens (the worker counts tokens)."
                ).strip()
    for name, key in ((n_field, "num_images"), ("steps", "steps"), ("guidance_scale", "guidance_scale")):
        target = _number_schema(props.get(name))
        if target is not None and key in lim:
            target["minimum"], target["maximum"] = lim[key]


def _set_kind(model: dict[str, Any], info: dict[str, Any]) -> None:
    """The condition fields of the served model's kind: a text-to-image model takes a ``prompt``
    (required) and no class fields; a class-conditional one a ``class_label`` or a class-name ``prompt``,
    and no ``negative_prompt``. Undocumented fields are refused (``additionalProperties`` false)."""
    props = model["properties"]
    if info.get("kind") != "class-conditional":
        props.pop("class_label", None)
        props.pop("cfg_schedule", None)
        prompt = _string_schema(props.get("prompt"))
        if prompt is not None:  # a string, never null
            outer = props["prompt"]
            props["prompt"] = {**prompt, **{k: outer[k] for k in ("pattern", "description") if k in outer}}
        model["required"] = sorted({*model.get("required", ()), "prompt"})
        return
    props.pop("negative_prompt", None)
    n = int(info.get("num_classes") or 1000)
    label = {"type": "integer", "minimum": 0, "maximum": n - 1}
    props["class_label"] = {"anyOf": [label, {"type": "array", "items": label, "minItems": 1}, {"type": "null"}],
                            "description": props.get("class_label", {}).get("description", "")}
    names = info.get("class_names")
    prompt = _string_schema(props.get("prompt"))
    if names and prompt is not None:  # exactly a class name (the server also takes other letter cases)
        props["prompt"].pop("pattern", None)
        prompt["enum"] = sorted(set(names))
    model["anyOf"] = [{"allOf": [{"anyOf": model["anyOf"]}, {"required": [key]}]} for key in ("class_label", "prompt")]


def _string_schema(prop: dict[str, Any] | None) -> dict[str, Any] | None:
    return _typed(prop, "string")


def _number_schema(prop: dict[str, Any] | None) -> dict[str, Any] | None:
    return _typed(prop, "integer") or _typed(prop, "number")


def _typed(prop: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    if prop is None:
        return None
    if prop.get("type") == kind:
        return prop
    for alt in prop.get("anyOf", ()):
        if alt.get("type") == kind:
            return alt
    return None


def _sizes(info: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(w), int(h)) for h, w in info["sizes"]]


def patch_schema(schema: dict[str, Any], info: dict[str, Any], aliases: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    comps = out.get("components", {}).get("schemas", {})
    sizes = _sizes(info)
    for name in ("GenerateBody", "GenerationParams"):
        model = comps.get(name)
        if model is None:
            continue
        props = model["properties"]
        _set_limits(props, info, "num_images")
        widths, heights = sorted({w for w, _ in sizes}), sorted({h for _, h in sizes})
        for key, values in (("width", widths), ("height", heights)):
            target = _number_schema(props.get(key))
            if target is not None:
                target["enum"] = values
        # width and height together form one allowed size, or are both left out (default size)
        model["anyOf"] = [
            {"properties": {"width": {"type": "null"}, "height": {"type": "null"}}},
            *(
                {"required": ["width", "height"], "properties": {"width": {"const": w}, "height": {"const": h}}}
                for w, h in sizes
            ),
        ]
        _set_kind(model, info)
    model = comps.get("OpenAIImageBody")
    if model is not None:
        model.update(copy.deepcopy(OPENAI_BODY_RULES))
        props = model["properties"]
        _set_limits(props, info, "n")
        size = _string_schema(props.get("size"))
        if size is not None:
            size.pop("pattern", None)
            size["enum"] = ["auto", *(f"{w}x{h}" for w, h in sizes)]
        mdl = _string_schema(props.get("model"))
        if mdl is not None:
            mdl["enum"] = [info["model"], *aliases]
    retrieve = out.get("paths", {}).get("/v1/models/{model_id}", {}).get("get")
    for param in (retrieve or {}).get("parameters", ()):
        if param.get("name") == "model_id":  # the ids GET /v1/models/{model_id} answers with 200
            param["schema"] = {**param.get("schema", {}), "enum": [info["model"], *aliases]}
    return out


# cross-field rules of the OpenAI body, stated in its schema (refused with 400 otherwise)
OPENAI_BODY_RULES: dict[str, Any] = {
    "allOf": [
        {  # output_compression needs a lossy format
            "anyOf": [
                {"properties": {"output_compression": {"type": "null"}}},
                {
                    "required": ["output_compression", "output_format"],
                    "properties": {"output_format": {"enum": ["jpeg", "webp"]}},
                },
            ]
        },
        {  # quality maps to a step count: not with an explicit steps
            "anyOf": [
                {"properties": {"quality": {"enum": ["auto", None]}}},
                {"properties": {"steps": {"type": "null"}}},
            ]
        },
    ]
}


def install_openapi(app: FastAPI, info_of: Any, aliases: list[str]) -> None:
    """``app.openapi()`` = FastAPI's schema + the served model's limits (recomputed until known)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "base" not in cache:
            cache["base"] = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for path in cache["base"].get("paths", {}).values():
                for op in path.values():
                    responses = op.get("responses", {}) if isinstance(op, dict) else {}
                    if "400" in responses:  # OpenAI routes answer 400 where FastAPI documents 422
                        responses.pop("422", None)
        info = info_of()
        if info is None or info.get("kind") == "tokenizer":  # no generator: nothing to state
            return cache["base"]
        key = repr((info.get("model"), info.get("sizes"), info.get("limits")))
        if cache.get("key") != key:
            cache["key"], cache["patched"] = key, patch_schema(cache["base"], info, aliases)
        return cache["patched"]

    app.openapi = openapi  # type: ignore[method-assign]
