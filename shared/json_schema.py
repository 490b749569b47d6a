"""JSON Schema of the contract models as they validate, for the OpenAPI and AsyncAPI documents.

Free text is stripped before its length is checked, so `minLength`/`maxLength` would be wrong both
ways (`" "` is refused, a padded name past 200 characters accepted): a pattern documents it instead."""

from __future__ import annotations

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

# what pydantic strips (Rust's `str::trim`: Unicode's White_Space), spelled out so that every regex
# dialect reads it alike (`\s` differs between JavaScript, Python and Rust)
WHITESPACE = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def stripped_text_pattern(min_length: int, max_length: int) -> str:
    """Text of `min_length` (0 or 1) to `max_length` characters once stripped: the outer runs take the
    whitespace, with `min_length` 1 the first character between them is not whitespace."""
    if min_length not in (0, 1):
        raise ValueError(f"no pattern for a stripped text of at least {min_length} characters")
    space, first = f"[{WHITESPACE}]*", f"[^{WHITESPACE}]" if min_length else ""
    return rf"^{space}{first}[\s\S]{{0,{max_length - min_length}}}{space}$"


class StrippedTextJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON schema, but a stripped string's bounds become a `stripped_text_pattern`."""

    def str_schema(self, schema: core_schema.StringSchema) -> JsonSchemaValue:
        json_schema = super().str_schema(schema)
        if not schema.get("strip_whitespace"):
            return json_schema
        if "pattern" in json_schema or "max_length" not in schema:
            raise ValueError(f"a stripped string needs a maximum length and no pattern: {schema}")
        min_length, max_length = schema.get("min_length", 0), schema["max_length"]
        del json_schema["maxLength"]
        json_schema.pop("minLength", None)
        json_schema["pattern"] = stripped_text_pattern(min_length, max_length)
        json_schema["description"] = (
            f"Surrounding whitespace is removed; {min_length} to {max_length} characters remain."
        )
        return json_schema
