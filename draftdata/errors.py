"""Exceptions that the CLI prints as one line (no traceback)."""


class DraftdataError(Exception):
    """Base class: a problem the user can act on; the message says what and where."""


class DatasetNotFoundError(DraftdataError):
    """The URL holds no dataset.json."""


class SchemaMismatchError(DraftdataError):
    """A writer's schema, or a part's arrays, disagree with dataset.json."""


class CorruptDataError(DraftdataError):
    """Stored bytes fail their checksum or structure check; the message names part and array/sample."""


class MissingPartsError(DraftdataError):
    """Parts a reader was asked for (a run's pinned snapshot) are not committed in the dataset."""


class StorageAccessError(DraftdataError):
    """The storage backend refused access (credentials, permissions, unknown scheme)."""


def name_some(names: list[str], limit: int = 5) -> str:
    """`a, b, c, d, e, ... (N entries)`: what a directory holds, short enough for a one-line error."""
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
