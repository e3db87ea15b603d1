"""Rows of a batch run: reading the input file, turning a row into a job, a result into an output row.

Input: JSONL (one JSON object a line) or Parquet, each row with ``prompt``, optional
``completion`` (text, or both lists of token ids), ``adapter`` or ``adapters`` (an ensemble, with ``merge``/``merge_params``),
``params`` and ``id``. A row that cannot become a job is not an error of the run: it
becomes an output row with an ``error``, and the run goes on.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.errors import JobValidationError
from producer.protocol import FAILED, Job, JobResult

MODES = ("loglik", "generate")
ROW_FIELDS = {"id", "prompt", "completion", "adapter", "adapters", "merge", "merge_params", "params"}
MAX_ROW_ID = 256


class BatchInputError(ValueError):
    """The input as a whole cannot be read (missing file, unknown format, no rows)."""


@dataclass
class Unparsable:
    """An input line that is not JSON: it becomes a row with this error."""
    error: str


@dataclass
class Row:
    index: int                      # position in the input, from 0: output order
    id: Any                         # the input row's id (else its index)
    job: dict | None                # the job fields, validated; None when the row is bad
    error: str | None = None
    route: str = ""                 # what the row's adapter routing sorts on

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "id": self.id, "job": self.job, "error": self.error,
                           "route": self.route}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Row:
        return cls(**json.loads(line))


def read_rows(path: str | Path, mode: str, token_logprobs: bool = False) -> Iterator[Row]:
    """Every row of the input file, in order, each validated into a job or marked bad."""
    if mode not in MODES:
        raise BatchInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"input file {str(path)!r} does not exist")
    records = _parquet_records(path) if path.suffix.lower() == ".parquet" else _jsonl_records(path)
    yield from rows_from_records(records, mode, token_logprobs)


def rows_from_records(records, mode: str, token_logprobs: bool = False) -> Iterator[Row]:
    """Rows from parsed records (an ``Unparsable`` stands for a line that was not JSON)."""
    if mode not in MODES:
        raise BatchInputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for index, record in enumerate(records):
        if isinstance(record, Unparsable):
            yield Row(index, index, None, record.error)
        else:
            yield to_row(index, record, mode, token_logprobs)


def jsonl_records(lines) -> Iterator[Any]:
    """JSON values of non-blank lines (bytes or str); a line that is not JSON yields ``Unparsable``."""
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw)
        except RecursionError:
            yield Unparsable(f"line {n}: not valid JSON: nested too deeply")
        except (ValueError, UnicodeDecodeError) as e:
            yield Unparsable(f"line {n}: not valid JSON: {e}")


def _jsonl_records(path: Path) -> Iterator[Any]:
    with open(path, "rb") as f:
        yield from jsonl_records(f)


def _parquet_records(path: Path) -> Iterator[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise BatchInputError("reading Parquet needs pyarrow: pip install 'openlora[parquet]'") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:       # pyarrow raises its own error types for a bad file
        raise BatchInputError(f"cannot read {str(path)!r} as Parquet: {e}") from e
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield {k: v for k, v in record.items() if v is not None}


def to_row(index: int, record: Any, mode: str, token_logprobs: bool) -> Row:
    if not isinstance(record, dict):
        return Row(index, index, None, f"a row must be a JSON object, got {type(record).__name__}")
    row_id = record.get("id", index)
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool) or len(str(row_id)) > MAX_ROW_ID:
        return Row(index, index, None, f"id must be a string or an integer of at most {MAX_ROW_ID} characters")
    unknown = sorted(set(record) - ROW_FIELDS)
    if unknown:
        return Row(index, row_id, None, f"unknown fields {unknown}; a row has {sorted(ROW_FIELDS)}")
    if "prompt" not in record:
        return Row(index, row_id, None, "missing field 'prompt'")
    if mode == "generate" and "completion" in record:
        return Row(index, row_id, None, "'completion' is scored in mode loglik; mode generate writes one")
    job = {k: record[k] for k in ("prompt", "completion", "adapter", "adapters", "merge", "merge_params", "params")
           if record.get(k) is not None}
    if isinstance(job["prompt"], list):             # token ids (a model without a tokenizer, pre-tokenized data)
        job["input_ids"] = job.pop("prompt")
        if "completion" in job:
            if not isinstance(job["completion"], list):
                return Row(index, row_id, None, "a prompt of token ids takes a completion of token ids")
            job["completion_ids"] = job.pop("completion")
    job["mode"] = "score" if mode == "loglik" else "generate"
    if mode == "loglik" and token_logprobs:
        job["params"] = {**(job.get("params") or {}), "logprobs": 0}
    try:
        parsed = Job.parse(job)
    except JobValidationError as e:
        return Row(index, row_id, None, str(e))
    return Row(index, row_id, job, route=parsed.route_key or "")


def job_for(row: Row, run_id: str, tenant: str | None) -> dict:
    """The job of a row: its id is fixed by the run and the row, so a resubmit after a crash
    finds the job already queued or done instead of scoring the row twice."""
    return {**row.job, "id": f"batch:{run_id}:{row.index}", "priority": -1, "tenant": tenant}


def output_row(row: Row, mode: str, result: JobResult | None) -> dict:
    """The output line of a row: its id and index, then its values or its error."""
    out: dict[str, Any] = {"id": row.id, "index": row.index}
    if row.job is not None:
        if row.job.get("adapter") is not None:
            out["adapter"] = row.job["adapter"]
        elif row.job.get("adapters") is not None:
            out["adapters"] = row.job["adapters"]
    if row.error is not None or result is None:
        out["error"] = row.error or "no result"
        return out
    if result.status != "done":
        reason = result.error or result.finish_reason or result.status
        out["error"] = reason if result.status == FAILED else f"{result.status}: {reason}"
        return out
    if mode == "loglik":
        out.update(result.score or {})
    else:
        out.update(text=result.text, finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
                   completion_tokens=result.completion_tokens)
    return out
