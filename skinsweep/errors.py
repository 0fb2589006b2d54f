"""One exception family for everything a user can get wrong.

Every message is a single line that names the file / field / image involved and says how to fix it
(scikit-learn style: what was asked, what was found, what to do). The CLI prints these without a
traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SkinsweepError(Exception):
    """Base class for user-facing errors (bad input, bad config, missing weights...)."""


class DataError(SkinsweepError):
    """A dataset folder, label file, image or split manifest is missing or malformed."""


class ConfigError(SkinsweepError):
    """A recipe, CLI option or other configuration value is invalid."""


class BackboneError(SkinsweepError):
    """An unknown backbone name, or weights that cannot be loaded."""


def short_list(items, n: int = 5) -> str:
    """Render the first ``n`` items and a count of the rest: ``a, b, c (+12 more)``."""
    items = [str(i) for i in items]
    head = ", ".join(items[:n])
    return head + (f" (+{len(items) - n} more)" if len(items) > n else "")


def did_you_mean(name, valid, *, n: int = 2, cutoff: float = 0.6, lower: bool = False) -> str:
    """``" (did you mean a or b?)"`` for the close matches of ``name`` among ``valid``, else ``""``.

    The one spelling-hint helper (difflib) behind every "unknown X" message; ``lower`` compares
    case-insensitively (backbone and calibrator names).
    """
    import difflib

    key = str(name).lower() if lower else str(name)
    close = difflib.get_close_matches(key, [str(v) for v in valid], n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def first_line(e: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class StoreWriteError(DataError):
    """A results file could not be written (disk full, quota, permissions) while a sweep was recording it.

    Files already written are untouched (every write goes to a temporary file first); ``str()`` says so,
    names the file, says what to do, and how to continue (``--resume``). ``with_command`` gives the same
    line with the exact command to continue (what the sweep runner prints).
    """

    def __init__(self, path, error: BaseException, *, kept=None) -> None:
        self.path, self.error, self.kept = str(path), error, str(kept) if kept else None
        super().__init__(self.with_command("`skinsweep sweep RECIPE --resume`"))

    @property
    def fix(self) -> str:
        import errno

        code = getattr(self.error, "errno", None)
        text = str(self.error).lower()
        if code in (errno.ENOSPC, errno.EDQUOT) or "no space" in text or "quota" in text:
            return "free space on that disk (or raise the quota)"
        if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "permission" in text or "read-only" in text:
            return "make that folder writable again"
        return "fix that folder (is the disk full, read-only or gone?)"

    def with_command(self, command: str) -> str:
        why = getattr(self.error, "strerror", None) or first_line(self.error)
        kept = f"; results already written ({self.kept}) are intact" if self.kept else ""
        return f"cannot write {self.path} ({why}){kept}; {self.fix}, then continue with {command}"
