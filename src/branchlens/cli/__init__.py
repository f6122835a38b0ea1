"""Command line: a thin shell over the stages (``python -m branchlens`` works too).

Each command parses its options into the stage's config or keywords and calls one stage; its
options' defaults are read from their homes (:mod:`branchlens.cli.defaults`), and every error
takes the one path of :func:`branchlens.cli.common.friendly`. The app and its global options
are in :mod:`~branchlens.cli.common`; one module per group of commands registers them, in the
order of the data path, which is the order ``--help`` lists them in.
"""

from branchlens.cli.common import DEBUG_ENV, QUIET_ENV, USER_ERROR_RC, app, rank

# isort: off
from branchlens.cli import data, sae, analysis, viz, pipeline  # noqa: E402, F401
# isort: on

__all__ = ["DEBUG_ENV", "QUIET_ENV", "USER_ERROR_RC", "app", "rank"]
