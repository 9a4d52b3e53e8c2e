"""schemathesis hooks of the conformance run (tests/test_server_openapi.py, ``SCHEMATHESIS_HOOKS``).

One limit cannot be stated in JSON Schema: a prompt's (or negative prompt's) length in *tokens* (``GET /info``
``limits.max_prompt_tokens``, counted by the worker). The operations declare the 422 (400 on the OpenAI route) it
causes, and the built-in ``positive_data_acceptance`` check is replaced by this one, which excuses exactly that
answer (code ``invalid_request``, field ``prompt`` or ``negative_prompt``, a message about tokens) and defers to the
built-in check for everything else.
"""

from __future__ import annotations

import json
import re

import schemathesis
from schemathesis.specs.openapi.checks import _openapi_positive_data_acceptance

TOKEN_LIMIT = re.compile(r"^(prompt|negative_prompt) is \d+ tokens long; at most \d+ tokens are allowed$")


def is_token_limit(response) -> bool:
    if response.status_code not in (400, 422):
        return False
    try:
        err = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (err.get("code") == "invalid_request" and err.get("param") in ("prompt", "negative_prompt")
            and bool(TOKEN_LIMIT.match(str(err.get("message", "")))))


@schemathesis.check
def positive_data_acceptance_but_token_limit(ctx, response, case):
    """``positive_data_acceptance``, except the documented token-limit answer to a schema-valid prompt."""
    if is_token_limit(response):
        return None
    return _openapi_positive_data_acceptance(ctx, response, case)
