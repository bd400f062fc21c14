"""Calibration text: from a dataset name, local files, a list of strings or a Dataset.

:func:`load_rows` turns any supported source into a list of text rows; :func:`build_samples`
packs rows into token samples of at most ``max_length`` tokens. ``datasets`` is imported
only for hub names, local files and ``datasets.Dataset`` inputs, so a list of strings
works where ``datasets`` is not installed.

Never a silent fallback: a source that cannot be read, or that holds no text, raises an
error naming the fix.
"""

from __future__ import annotations

import codecs
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..validation import TIDEError

__all__ = ["CalibrationDataError", "load_rows", "build_samples", "TokenSamples", "find_text_files",
           "check_text_file", "read_text_file"]

# Extensions read from a folder; anything else in it is ignored.
_TEXT_SUFFIXES = (".txt", ".text", ".md")
# Candidate samples packed before the seeded choice of ``num_samples`` of them.
_CANDIDATE_FACTOR = 4


# Bytes read at a time when checking that a file is text.
_CHECK_CHUNK = 1 << 20


class CalibrationDataError(TIDEError):
    """The calibration text source cannot be used (the message says how to fix it)."""


@dataclass
class TokenSamples:
    """Tokenized calibration samples.

    Attributes:
        input_ids: one list of token ids per sample, each ``1 .. max_length`` long.
        pad_token_id: id used to pad batches (masked out everywhere).
        source: short description of where the text came from (saved in metadata).
    """

    input_ids: list[list[int]]
    pad_token_id: int
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def find_text_files(path: str | os.PathLike[str]) -> list[str]:
    """Text files at ``path``: the file itself, or a folder's text files (recursive, sorted)."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(
            str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES
        )
        if not files:
            raise CalibrationDataError(
                f"calibration folder {str(p)!r} holds no text files "
                f"({', '.join(_TEXT_SUFFIXES)}); pass files or a folder with text in it"
            )
        return files
    raise CalibrationDataError(f"calibration data file or folder {str(p)!r} does not exist")


def check_text_file(path: str | os.PathLike[str], encoding: str = "utf-8") -> None:
    """Fail unless ``path`` is readable text in ``encoding``, naming the file and the
    encoding (read in chunks: memory stays small for any file size).

    Raises:
        CalibrationDataError: unreadable, binary (NUL bytes), or not ``encoding``.
    """
    name = os.fspath(path)
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    try:
        with open(name, "rb") as f:
            while chunk := f.read(_CHECK_CHUNK):
                nul = chunk.find(b"\0")
                if nul >= 0:
                    raise CalibrationDataError(
                        f"{name} is not text: it holds a NUL byte at offset {offset + nul} "
                        f"(a binary file?); pass {encoding} text files")
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise CalibrationDataError(
                        f"{name} is not {encoding} text (byte 0x{chunk[max(exc.start, 0)]:02x} near offset "
                        f"{offset + max(exc.start, 0)}): convert it, e.g. iconv -f latin1 -t {encoding} "
                        f"{name} > converted.txt") from None
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CalibrationDataError(f"{name} is not {encoding} text (it ends inside a character): "
                                   f"convert it to {encoding}") from None
    except OSError as exc:
        raise CalibrationDataError(f"cannot read {name}: {exc.strerror or exc}") from None


def read_text_file(path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    """The text of ``path``, or :class:`CalibrationDataError` naming the file and encoding."""
    check_text_file(path, encoding)
    try:
        return Path(path).read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"cannot read {os.fspath(path)} as {encoding} text: {exc}") from None


def _looks_local(source: str) -> bool:
    """A path rather than a hub name ("name" or "owner/name")?"""
    if Path(source).expanduser().exists():
        return True
    if source.startswith((".", "~", os.path.sep)) or source.endswith(os.path.sep):
        return True
    return Path(source).suffix.lower() in _TEXT_SUFFIXES or source.count("/") > 1


def _import_datasets(why: str) -> Any:
    try:
        import datasets
    except ImportError as exc:  # the GPU machine has no `datasets`
        raise CalibrationDataError(
            f"reading {why} needs the `datasets` package (pip install datasets); "
            "or pass the calibration text as a list of strings"
        ) from exc
    return datasets


def _load_local(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], str]:
    files: list[str] = []
    for path in paths:
        files.extend(find_text_files(os.path.expanduser(os.fspath(path))))
    for f in files:  # a clear error before the datasets loader's own
        check_text_file(f)
    datasets = _import_datasets("local text files")
    # One row per file, verbatim: build_samples cuts it between lines, blank lines kept.
    try:
        ds = datasets.load_dataset(
            "text", data_files=files, split="train", sample_by="document", keep_linebreaks=True
        )
    except Exception as exc:  # the datasets library raises its own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationDataError(f"could not read the calibration text files ({first}); "
                                   "pass UTF-8 text files, or the text as a list of strings") from exc
    return list(ds["text"]), "files: " + ", ".join(files[:8]) + (" ..." if len(files) > 8 else "")


def _load_hub(name: str, config_name: str | None, split: str, text_field: str | None) -> tuple[list[str], str]:
    datasets = _import_datasets(f"the hub dataset {name!r}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:
        why = "the HuggingFace hub is offline (HF_HUB_OFFLINE=1)" if offline else (
            f"it could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
        raise CalibrationDataError(
            f"cannot load calibration dataset {name!r} (config={config_name!r}, split={split!r}): "
            f"{why}. {'(No local file or folder of that name exists either.) ' if '/' in name else ''}"
            "Pass local text files or a folder instead (dataset='path/to/texts' or "
            "tide-compile calibrate --data FILE...), or a list of strings."
        ) from exc
    return _rows_from_dataset(ds, text_field), f"hub: {name}" + (f"/{config_name}" if config_name else "") + f"[{split}]"


def _rows_from_dataset(ds: Any, text_field: str | None) -> list[str]:
    if isinstance(ds, dict):  # a DatasetDict
        raise CalibrationDataError(
            f"got a dataset with several splits ({', '.join(ds.keys())}); pick one, e.g. dataset['train']"
        )
    columns = list(getattr(ds, "column_names", []) or [])
    if text_field is None:
        if "text" in columns:
            text_field = "text"
        else:
            features = getattr(ds, "features", {}) or {}
            string_cols = [
                c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")
            ]
            if len(string_cols) != 1:
                raise CalibrationDataError(
                    f"cannot tell which column holds the text (columns: {columns}); "
                    "pass text_field=... (CLI: --text-field)"
                )
            text_field = string_cols[0]
    if text_field not in columns:
        raise CalibrationDataError(f"dataset has no column {text_field!r} (columns: {columns})")
    return [t for t in ds[text_field] if isinstance(t, str)]


def load_rows(
    dataset: Any,
    *,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str | None = None,
) -> tuple[list[str], str]:
    """Text rows from a calibration source, and a description of the source.

    Args:
        dataset: a HuggingFace dataset name; a local text file or folder (or a list of
            them, as paths); a list of strings (used as text, no ``datasets`` needed);
            or a ``datasets.Dataset``.
        dataset_config: the hub dataset's configuration name (e.g. ``"wikitext-2-raw-v1"``).
        split: the split to read from a hub dataset.
        text_field: the column with the text (default: ``"text"`` or the only string column).

    Raises:
        CalibrationDataError: a missing file, an unreachable hub (offline), an empty
            source, or an unsupported type.
    """
    if dataset is None:
        raise CalibrationDataError(
            "no calibration data: pass dataset=... (local text files, a folder, a list of strings, "
            "a datasets.Dataset or a hub name) or set TIDEConfig.calibration_dataset"
        )
    if isinstance(dataset, (str, os.PathLike)):
        source = os.fspath(dataset)
        if not source.strip():
            raise CalibrationDataError("calibration dataset name is empty")
        if _looks_local(source):
            rows, desc = _load_local([source])
        else:
            rows, desc = _load_hub(source, dataset_config, split, text_field)
    elif isinstance(dataset, (list, tuple)):
        if not dataset:
            raise CalibrationDataError("the calibration text list is empty")
        if all(isinstance(x, Path) for x in dataset):
            rows, desc = _load_local(list(dataset))
        elif all(isinstance(x, str) for x in dataset):
            rows, desc = list(dataset), f"list of {len(dataset)} strings"
        else:
            bad = next(x for x in dataset if not isinstance(x, (str, Path)))
            raise CalibrationDataError(
                f"a calibration list must hold strings (texts) or pathlib.Path objects, got {type(bad).__name__}"
            )
    elif hasattr(dataset, "column_names"):  # datasets.Dataset or DatasetDict
        rows, desc = _rows_from_dataset(dataset, text_field), f"datasets.Dataset ({len(dataset)} rows)"
    else:
        raise CalibrationDataError(
            f"unsupported calibration dataset type {type(dataset).__name__}: pass a hub name, "
            "a path, a list of strings or a datasets.Dataset"
        )
    if not any(r.strip() for r in rows):
        raise CalibrationDataError(f"the calibration data ({desc}) holds no text")
    return rows, desc


def _encode(tokenizer: Any, text: str, *, special: bool, max_length: int | None = None) -> list[int]:
    kwargs: dict[str, Any] = {"add_special_tokens": special}
    if max_length is None:
        return [int(i) for i in tokenizer(text, **kwargs)["input_ids"]]
    kwargs.update(truncation=True, max_length=max_length)
    # A fast tokenizer keeps truncation=True as state on its backend (transformers 5.x)
    # until its next call without truncation: a backend_tokenizer.encode in between (as
    # bench_quality, tune and demo.perplexity encode long text) would be cut to
    # max_length. Put the backend's setting back as it was.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    saved = getattr(backend, "truncation", None) if backend is not None else None
    try:
        ids = tokenizer(text, **kwargs)["input_ids"]
    finally:
        if backend is not None:
            if saved is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**saved)
    return [int(i) for i in ids]


def _pieces(tokenizer: Any, row: str, max_length: int) -> list[tuple[str, int]]:
    """``row`` as consecutive pieces of at most about ``max_length`` tokens, with their counts.

    A long row (a whole document, say) is cut between lines, keeping blank lines, so
    that joining the pieces with newlines gives the row back; a single line that is
    still too long is cut at characters. Nothing is lost to truncation.
    """
    row = row.strip("\n")
    if not row.strip():
        return []
    n = len(_encode(tokenizer, row, special=False))
    if n <= max_length:
        return [(row, n)]
    lines = row.split("\n")
    if len(lines) == 1:
        step = max(1, len(row) * max_length // n)
        chunks = [row[i : i + step] for i in range(0, len(row), step)]
        return [(c, len(_encode(tokenizer, c, special=False))) for c in chunks if c.strip()]
    out: list[tuple[str, int]] = []
    group: list[str] = []
    size = 0
    for line in lines:
        k = len(_encode(tokenizer, line, special=False)) + 1 if line else 1
        if group and size + k > max_length:
            out.append(("\n".join(group), size))
            group, size = [], 0
        if k > max_length:
            out.extend(_pieces(tokenizer, line, max_length))
            continue
        group.append(line)
        size += k
    if group and "\n".join(group).strip():
        out.append(("\n".join(group), size))
    return out


def build_samples(
    tokenizer: Any,
    rows: Sequence[str],
    *,
    num_samples: int,
    max_length: int,
    seed: int = 0,
    source: str = "",
) -> TokenSamples:
    """Pack ``rows`` into ``num_samples`` token samples of at most ``max_length`` tokens.

    Consecutive non-empty rows are joined, with a blank line between them, into
    samples of up to ``max_length`` tokens (so line- or paragraph-sized rows give
    full-length samples); rows longer than a quarter sample are first cut between
    lines (or, for one long line, at characters), so that the text keeps its own line
    breaks and little is lost to truncation. Each sample is tokenized once, with the
    tokenizer's special tokens, and truncated to ``max_length``. Up to ``4 * num_samples`` candidates are packed in
    order and ``num_samples`` of them are chosen at random (seeded), kept in order.
    Fewer candidates than asked for means all of them are used.

    Args:
        tokenizer: callable as ``tokenizer(text, add_special_tokens=..., truncation=...,
            max_length=...)`` returning ``{"input_ids": [...]}`` (any HF tokenizer).
    """
    if max_length < 2:
        raise CalibrationDataError(f"max_length must be at least 2 tokens, got {max_length}")
    if num_samples < 1:
        raise CalibrationDataError(f"num_samples must be at least 1, got {num_samples}")
    candidates: list[str] = []
    parts: list[str] = []
    length = 0
    limit = num_samples * _CANDIDATE_FACTOR
    budget = max(1, max_length - len(_encode(tokenizer, "", special=True)))  # room for BOS etc.
    for row in rows:
        if len(candidates) >= limit:
            break
        # Small pieces (a quarter sample) let samples fill up to the budget.
        for j, (piece, n) in enumerate(_pieces(tokenizer, row, max(1, budget // 4))):
            if parts and length + n + 1 > budget:
                candidates.append("".join(parts))
                parts, length = [], 0
                if len(candidates) >= limit:
                    break
            # Rows are separate texts (a blank line between them); pieces of one row
            # are consecutive lines.
            if parts:
                parts.append("\n\n" if j == 0 else "\n")
            parts.append(piece)
            length += n + 1
    if parts and len(candidates) < limit:
        candidates.append("".join(parts))
    if len(candidates) > num_samples:
        chosen = sorted(random.Random(seed).sample(range(len(candidates)), num_samples))
        candidates = [candidates[i] for i in chosen]
    ids = [_encode(tokenizer, text, special=True, max_length=max_length) for text in candidates]
    ids = [x[:max_length] for x in ids if x]
    if not ids:
        raise CalibrationDataError(f"the calibration data ({source or 'rows'}) tokenizes to nothing")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return TokenSamples(input_ids=ids, pad_token_id=int(pad) if pad is not None else 0, source=source)
