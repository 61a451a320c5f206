"""Evaluation texts: WikiText-2 raw test, a PG-19 book, or a text file.

The offline copies in the data folder (``--data-dir`` / ``$KVPRESS_NEOX_DATA``; see
../shared/data/MANIFEST.md) are read first; otherwise Hugging Face ``datasets`` fetches
wikitext-2-raw-v1 (test) or pg19 (test, row ``sample_idx``). Line ends are normalised to
``\\n`` before tokenising.
"""

from pathlib import Path

DATASETS = ("wikitext", "pg19")


class DataError(RuntimeError):
    """The requested text cannot be found; the message names the ways to provide it."""


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def _from_hub(dataset: str, sample_idx: int, data_folder: Path | None) -> str:
    from evaluation.models import offline_unless_hub_reachable

    offline = offline_unless_hub_reachable()  # no ~75 s of retries when the hub cannot be reached
    try:
        import datasets

        if dataset == "wikitext":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return "".join(rows["text"])
        rows = datasets.load_dataset("deepmind/pg19", split="test", streaming=True)
        return next(iter(rows.skip(sample_idx)))["text"]
    except Exception as error:  # datasets raises many kinds (ConnectionError, HfHubHTTPError, ...)
        missing = f" ({data_folder} does not exist)" if data_folder is not None and not data_folder.is_dir() else ""
        hub = "Hugging Face datasets cannot reach the hub from here" if offline else "Hugging Face datasets failed"
        raise DataError(
            f"{dataset} not found: no offline copy{missing} (pass --data-dir or set KVPRESS_NEOX_DATA to the folder "
            f"holding wikitext-2-raw-v1/ and pg19/) and {hub} ({error.__class__.__name__})"
        ) from None


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, line ends normalised; a binary or empty file is a DataError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}): give a plain text file") from None
    if not text.strip():
        raise DataError(f"{path} holds no text: give a file with the text to score")
    return _normalise(text)


def load_text(dataset: str, data_folder: Path | None, sample_idx: int = 0) -> tuple[str, str]:
    """Return (text, source description). ``dataset`` is 'wikitext', 'pg19' or a file path;
    ``sample_idx`` picks the PG-19 book (local files in name order, or the hub test split)."""
    if sample_idx < 0:
        raise DataError(f"--sample_idx must be >= 0, got {sample_idx}")
    if dataset not in DATASETS:
        path = Path(dataset)
        if not path.is_file():
            raise DataError(f"unknown dataset {dataset!r}: choose {' or '.join(DATASETS)}, or give a text file path")
        if sample_idx:
            raise DataError("--sample_idx picks a PG-19 book; a text file is one sample")
        return read_text_file(path), f"file {path}"

    if dataset == "wikitext" and sample_idx:
        raise DataError("--sample_idx picks a PG-19 book; WikiText test is one text (use --num_windows)")
    if data_folder is not None:
        if dataset == "wikitext":
            local = data_folder / "wikitext-2-raw-v1" / "test.raw"
            if local.is_file():
                return read_text_file(local), f"wikitext-2-raw-v1 test (local {local})"
        else:
            books = sorted((data_folder / "pg19").glob("*.txt"))
            if sample_idx < len(books):
                book = books[sample_idx]
                return read_text_file(book), f"PG-19-style book {book.name} (local)"
            if books:
                raise DataError(f"--sample_idx {sample_idx} out of range: {len(books)} local PG-19 books")
    text = _normalise(_from_hub(dataset, sample_idx, data_folder))
    return text, ("wikitext-2-raw-v1 test (hub)" if dataset == "wikitext" else f"pg19 test row {sample_idx} (hub)")
