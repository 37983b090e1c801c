class DowngradeRefused(RuntimeError):
    """A downgrade would lose what the older release cannot keep; the message names what to do first.
    Under alembic's own command line (docs/operations.md's way back a release) it ends the command with that
    message alone, as alembic's own refusals do: a traceback put it below thirty lines of alembic."""
