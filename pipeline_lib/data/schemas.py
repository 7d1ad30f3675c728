"""Normalise the common public preference and SFT schemas, and validate rows.

Preference pairs become ``{"prompt", "chosen", "rejected"}`` strings:
* ``prompt_chosen_rejected``: explicit prompt, string answers (TL;DR comparisons,
  ``trl-lib/tldr-preference``);
* ``conversational``: chosen/rejected are message lists, with or without a ``prompt``
  column (UltraFeedback binarized): the prompt is the user turn(s), the answers the
  final assistant turns;
* ``transcript``: chosen/rejected are whole ``Human:/Assistant:`` transcripts with no
  prompt column (Anthropic HH): the shared prefix up to the last ``Assistant:`` is the
  prompt.
SFT rows become ``{"prompt", "completion"}`` from prompt/completion, messages, or the
chosen side of pairs.

Validation collects every problem with the row number and field, so one run of
``python -m pipeline_lib.data SOURCE`` shows them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from pipeline_lib.errors import PipelineError

PAIR_SCHEMAS = ("prompt_chosen_rejected", "conversational", "transcript")
SFT_SCHEMAS = ("prompt_completion", "messages", "pairs")
TRANSCRIPT_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class RowProblem:
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, field {self.field!r}: {self.message}"


class DataValidationError(PipelineError, ValueError):
    """Rows that cannot be trained on; the message names the source, rows and fields."""

    def __init__(self, source: str, problems: list[RowProblem] | str, max_listed: int = 20):
        if isinstance(problems, str):
            message = f"{source}: {problems}"
        else:
            listed = "\n".join(f"  {problem}" for problem in problems[:max_listed])
            more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
            message = f"{source}: {len(problems)} invalid row(s)\n{listed}{more}"
        super().__init__(message)
        self.source = source
        self.problems = problems


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def detect_pair_schema(columns: Iterable[str], first_row: dict[str, Any]) -> str:
    columns = set(columns)
    if not {"chosen", "rejected"} <= columns:
        missing = sorted({"chosen", "rejected"} - columns)
        raise ValueError(f"missing column(s) {missing}; preference data needs chosen and rejected")
    if _is_messages(first_row.get("chosen")):
        return "conversational"
    if "prompt" in columns:
        return "prompt_chosen_rejected"
    return "transcript"


def detect_sft_schema(columns: Iterable[str], first_row: dict[str, Any]) -> str:
    columns = set(columns)
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if "chosen" in columns:
        return "pairs"
    raise ValueError(f"missing columns: SFT data needs prompt/completion, messages, or chosen (have {sorted(columns)})")


def _messages_to_prompt(messages: list[dict[str, Any]]) -> str:
    """The conversation before the answer: one user turn as is, several as role-tagged lines."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return str(turns[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def _split_conversation(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message is not an assistant turn")
    return messages[:-1], messages[-1]["content"]


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic-HH style: the prompt is everything up to and including the last
    ``Assistant:`` the two transcripts share."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(TRANSCRIPT_MARKER, 0, shared + 1)
    if cut < 0:
        raise ValueError("no shared 'Assistant:' turn to split prompt from answers")
    cut += len(TRANSCRIPT_MARKER)
    return chosen[:cut].strip(), chosen[cut:].strip(), rejected[cut:].strip()


def normalize_pair(row: dict[str, Any], schema: str) -> dict[str, str]:
    if schema == "prompt_chosen_rejected":
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if schema == "conversational":
        chosen_context, chosen = _split_conversation(row["chosen"])
        rejected_context, rejected = _split_conversation(row["rejected"])
        prompt = row.get("prompt")
        if _is_messages(prompt):
            prompt = _messages_to_prompt(prompt)
        elif not prompt:
            if chosen_context != rejected_context:
                raise ValueError("chosen and rejected conversations have different prompts")
            prompt = _messages_to_prompt(chosen_context)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if schema == "transcript":
        prompt, chosen, rejected = split_transcript(row["chosen"], row["rejected"])
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise ValueError(f"unknown preference schema {schema!r}")


def normalize_sft(row: dict[str, Any], schema: str) -> dict[str, str]:
    if schema == "prompt_completion":
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if schema == "messages":
        context, answer = _split_conversation(row["messages"])
        return {"prompt": _messages_to_prompt(context), "completion": answer}
    if schema == "pairs":
        pair = normalize_pair(row, detect_pair_schema(row.keys(), row))
        return {"prompt": pair["prompt"], "completion": pair["chosen"]}
    raise ValueError(f"unknown SFT schema {schema!r}")


# Longest accepted prompt or response (data.max_field_chars): tokenizers and collators
# process a whole field before truncating it, so one 50 MB line costs gigabytes.
DEFAULT_MAX_FIELD_CHARS = 20_000


def _text_problem(value: Any, max_chars: int) -> str | None:
    if value is None:
        return "is empty (null)"
    if not isinstance(value, str):
        return f"is not text ({type(value).__name__})"
    if not value.strip():
        return "is empty"
    if len(value) > max_chars:
        return f"is {len(value)} characters long, over the limit of {max_chars} (data.max_field_chars)"
    return None


def normalize_rows(
    rows: list[dict[str, Any]], kind: str, source: str, max_chars: int = DEFAULT_MAX_FIELD_CHARS
) -> tuple[str, list[dict[str, str]]]:
    """Detect the schema, normalise every row and validate it. Raises DataValidationError."""
    if not rows:
        raise DataValidationError(source, "no rows")
    try:
        schema = (detect_pair_schema if kind == "pairs" else detect_sft_schema)(rows[0].keys(), rows[0])
    except ValueError as error:
        raise DataValidationError(source, str(error)) from None
    fields = ("prompt", "chosen", "rejected") if kind == "pairs" else ("prompt", "completion")
    normalised: list[dict[str, str]] = []
    problems: list[RowProblem] = []
    for index, row in enumerate(rows):
        try:
            item = normalize_pair(row, schema) if kind == "pairs" else normalize_sft(row, schema)
        except KeyError as error:
            # str(KeyError) is only the quoted key: report it as the field, not the schema.
            problems.append(RowProblem(index, str(error.args[0]), f"is missing (schema {schema})"))
            continue
        except (TypeError, ValueError) as error:
            problems.append(RowProblem(index, schema, str(error)))
            continue
        row_problems = [RowProblem(index, name, problem) for name in fields if (problem := _text_problem(item[name], max_chars))]
        if kind == "pairs" and not row_problems and item["chosen"].strip() == item["rejected"].strip():
            row_problems.append(RowProblem(index, "rejected", "is identical to chosen"))
        problems.extend(row_problems)
        normalised.append(item)
    if problems:
        raise DataValidationError(source, problems)
    return schema, normalised
