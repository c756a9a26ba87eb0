"""The errors vlmguard reports to a person: one line, no traceback."""


class VlmguardError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with exit_code."""

    exit_code = 1


class ConfigError(VlmguardError):
    exit_code = 2


class StartupError(VlmguardError):
    """vlmguard run cannot start: another instance, a port in use, a missing dependency."""

    exit_code = 2


class DatabaseError(VlmguardError):
    """The job table cannot be reached or is not one this vlmguard understands."""


class UnusableDatabase(DatabaseError):
    """The database is there but cannot serve: not SQLite, another program's SQLite file,
    or a file or folder vlmguard may not write. A person must fix it; retrying will not."""

    exit_code = 2


class LeaseLost(Exception):
    """This worker no longer holds the job: another worker or the rescuer has it now."""


class DatabaseUnreachable(DatabaseError):
    """The database is down, unreachable or held busy for now: nothing is wrong with it,
    so the processes that need it wait and try again (recording never needs it)."""


def first_line(value: object) -> str:
    """The first line of an error or a message, at most 300 characters, for one-line logs,
    statuses and error texts; an exception without text is named by its type."""
    lines = str(value).strip().splitlines()
    if lines:
        return lines[0][:300]
    return type(value).__name__ if isinstance(value, BaseException) else ""
