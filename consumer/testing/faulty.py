"""``python -m consumer.testing.faulty ARGS``: the ``consumer`` command with faults installed.

The test entry point of worker and relay processes in the test suite and the chaos campaign:
``DEDUP_TEST_FAULTS`` (``point=probability,...``, consumer/testing/faults.py) and
``DEDUP_TEST_BROKEN`` (the deliberately broken build) are read here and nowhere else, then the
CLI runs as usual. Workers a supervisor starts from here are started from here too
(consumer/supervisor.py runs workers with its own entry module), so they get them as well.
Not outside the CONSUMER_ prefix by accident: the framework's settings refuse unknown
``CONSUMER_*`` variables, and these are not settings.
"""

from __future__ import annotations

import os


def main() -> None:
    from consumer.cli import main as cli_main
    from consumer.testing import faults

    faults.configure(
        os.environ.get("DEDUP_TEST_FAULTS", ""), broken=os.environ.get("DEDUP_TEST_BROKEN", "")
    )
    cli_main()


if __name__ == "__main__":
    main()
