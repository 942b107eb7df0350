"""What every API family shares: the request models' strictness, the text and token-id types, the
error a handler raises (APIError) and the error response it becomes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .guard import error_body


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: a lone surrogate (\\u{ord(text[e.start]):04x}) at "
                         f"character {e.start}; send UTF-8 text") from None
    return text


# Every string a request carries: text that cannot be encoded as UTF-8 is refused as a 400 naming the
# field, before anything downstream (tokenizer, JSON encoder) meets it.
Text = Annotated[str, AfterValidator(_utf8)]


TokenId = Annotated[int, Field(ge=0)]  # checked against the vocabulary by Server.check_ids


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None, path: str = "") -> Response:
    """An error response in the shape of the API family of `path` (see guard.error_body)."""
    return Response(error_body(status, message, type, param, code, path), status_code=status, headers=headers,
                    media_type="application/json")


MAX_STOP = 4  # as OpenAI: up to 4 stop sequences


class Strict(BaseModel):
    """A request object whose unknown fields are refused (400 naming them), never dropped."""
    model_config = ConfigDict(extra="forbid")


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(populate_by_name=True)  # and extra="forbid", from Strict

    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema", description="the JSON Schema the reply matches")
    strict: bool | None = Field(None, description="true: the schema must be strict as OpenAI defines it (every object "
                                                  "closed, every key required), else a 400; the reply is constrained "
                                                  "to the schema either way")
