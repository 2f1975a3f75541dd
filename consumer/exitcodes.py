"""Exit codes of the ``consumer`` command, one name each (documented in docs/operations.md).

Process managers and scripts branch on these: a restart helps after RET_KILLED or
RET_WORKER_FAILED, never after RET_CONFIG, RET_IMPORT or RET_MIGRATION.
"""

from __future__ import annotations

RET_OK = 0  # stopped on request, every worker drained within the grace period
RET_ERROR = 1  # unexpected error; a traceback was logged (also Python's own code for one)
RET_CONFIG = 2  # bad command-line option or CONSUMER_* setting (click's usage errors use 2 too)
RET_IMPORT = 3  # MODULE:APP cannot be imported, raised while importing, or is not an App
RET_CONNECT = 4  # a service (PostgreSQL, Redis) could not be reached at start
RET_KILLED = 5  # shutdown grace period expired: workers still running were SIGKILLed
RET_WORKER_FAILED = 6  # a worker failed in a way a restart cannot fix, or failed while draining
RET_NOT_FOUND = 7  # admin commands: no inbox record for that namespace and key
RET_ABORTED = 8  # admin commands: the confirmation was declined; nothing was changed
RET_MIGRATION = 9  # an applied migration's file was edited or deleted: nothing was started
RET_UNCONFIRMED = 10  # admin commands: no --yes and stdin is not a terminal; nothing changed
RET_BUSY = 11  # admin commands: a running batch held the row past the lock timeout; retry
RET_KAFKA_AUTH = 12  # the broker refused the SASL login or its TLS certificate is untrusted
RET_TOPICS = 13  # a source topic is missing (run), or `topics --check` found one missing
RET_STARTUP = 14  # an on_startup hook of the app raised: the worker consumed nothing

NAMES: dict[int, str] = {
    code: name
    for name, code in sorted(globals().items())
    if name.startswith("RET_") and isinstance(code, int)
}


def of_error(exc: BaseException) -> int:
    """The code a start-up error exits with: RET_KAFKA_AUTH, RET_TOPICS, RET_MIGRATION or
    RET_CONFIG for the ConfigError family, RET_STARTUP or RET_WORKER_FAILED for a lifespan
    hook's failure, RET_ERROR for anything else."""
    from consumer import errors

    for kind, code in (
        (errors.KafkaAuthError, RET_KAFKA_AUTH),
        (errors.TopicsMissing, RET_TOPICS),
        (errors.MigrationMismatch, RET_MIGRATION),
        (errors.ConfigError, RET_CONFIG),
        (errors.StartupFailed, RET_STARTUP),
        (errors.ShutdownFailed, RET_WORKER_FAILED),
    ):
        if isinstance(exc, kind):
            return code
    return RET_ERROR
