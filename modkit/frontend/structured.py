"""Structured outputs in the API: ``response_format`` and vLLM's ``structured_outputs``, made one
``StructuredOutputsParams``.

Two ways to ask, as in vLLM 0.32 (on chat and completions alike)::

    "response_format": {"type": "json_object"}
    "response_format": {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    "structured_outputs": {"json": {...}} | {"regex": "..."} | {"choice": [...]} | {"grammar": "..."}

(the openai client sends the second through ``extra_body``). ``response_format`` wins over the
kind named in ``structured_outputs``, whose options (``disable_any_whitespace``) still apply.
What modkit does not serve is refused with a 400 naming the field: vLLM's structural tags
and ``whitespace_pattern``, and the ``guided_json``/``guided_regex``/... fields vLLM has removed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema

from modkit.sampling_params import SamplingParamsError, StructuredOutputsParams


def _removed(value: Any, info: ValidationInfo) -> None:
    if value is not None:
        raise ValueError(f"{info.field_name} is not supported (vLLM 0.32 no longer reads it): use structured_outputs")


# vLLM's fields before structured_outputs: refused with a 400 that names them, never ignored.
Removed = Annotated[Any, AfterValidator(_removed), WithJsonSchema({"type": "null"})]


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema (``schema`` is a JSON Schema object)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(BaseModel):
    """vLLM's ``structured_outputs``: one constraint, and its options. Unknown keys are a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class StructuredOutputFields(BaseModel):
    """The request fields that constrain the output; the chat and completion requests have them."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: Removed = None
    guided_regex: Removed = None
    guided_choice: Removed = None
    guided_grammar: Removed = None
    guided_json_object: Removed = None
    guided_decoding_backend: Removed = None
    guided_whitespace_pattern: Removed = None

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar the output must follow, or None; SamplingParamsError names the field at fault."""
        options = self.structured_outputs
        fields: dict[str, Any] = {} if options is None else options.model_dump(exclude_none=True)
        if "json_" in fields:
            fields["json"] = fields.pop("json_")
        param = "structured_outputs"
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            param = "response_format"
            fields = {k: v for k, v in fields.items() if k == "disable_any_whitespace"}
            if fmt.type == "json_object":
                fields["json_object"] = True
            else:
                if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                    raise SamplingParamsError(
                        "response_format", "response_format of type json_schema needs json_schema.schema"
                    )
                fields["json"] = fmt.json_schema.schema_
        if options is None and param == "structured_outputs":
            return None
        try:
            return StructuredOutputsParams(**fields)
        except SamplingParamsError as err:
            raise SamplingParamsError(param, f"{param}: {err}") from None
