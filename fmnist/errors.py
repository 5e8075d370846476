"""Errors a user can fix. Entry points print them as one paragraph and exit non-zero."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" for none): what a paragraph quotes of a library's error, whose
    later lines are its traceback-like detail or links to its docs."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


class FmnistError(Exception):
    """Base class: the message alone says what went wrong and what was expected."""

    exit_code = 2
    # Whether under DDP every rank raises it at the same point, so that rank 0 alone records and reports it.
    on_every_rank = False


class DataError(FmnistError):
    """A data file is missing or malformed."""


class ConfigError(FmnistError):
    """A config value is out of range or inconsistent."""


class CheckpointError(FmnistError):
    """A checkpoint is missing, corrupt or unsafe to load."""


class StorageError(FmnistError):
    """A file could not be written: disk full, read-only file system, no permission."""


class OutOfMemory(FmnistError):
    """The device ran out of memory for a setting (a batch too large for it): that run's or that trial's alone."""


class DivergedError(FmnistError):
    """Training blew up: a non-finite loss, a finite one too large to be learning, or an optimizer step that
    overflows float32."""

    exit_code = 3
    on_every_rank = True  # the ranks' mean loss, synced validation and test losses, identical weights after a step


# A sweep in which some job did not complete (failed or diverged; its summary lists them): what a
# script running sweeps needs to know, with the same code as one diverged run.
INCOMPLETE_SWEEP_EXIT_CODE = DivergedError.exit_code


def error_in_chain(error: BaseException | None, kinds) -> BaseException | None:
    """The first of `error` and the errors it was raised from or while handling (`__cause__`, else `__context__`)
    that is one of `kinds`; None if none is."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def chained_fmnist_error(error: BaseException) -> FmnistError | None:
    """The FmnistError that caused `error` (a Hydra or OmegaConf error around a resolver's check), if any."""
    return error_in_chain(error, FmnistError)
