"""The two kinds of failure a user sees: their input is wrong (exit 2) or the run went wrong (exit 1)."""


class UnidaskError(Exception):
    """A failure reported to the user as one line, never a traceback."""

    exit_code = 1


class InputError(UnidaskError, ValueError):
    """Bad config, bad arguments or a file that is not what it should be."""

    exit_code = 2


class RunError(UnidaskError, RuntimeError):
    """The run could not finish: missing tasks, a failing worker, a full disk."""

    exit_code = 1


class Stopped(RunError):
    """Stopped by a signal (SLURM's, before the walltime) after staging every finished task."""

    exit_code = 3
