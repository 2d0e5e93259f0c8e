class EigenExportError(ValueError):
    """A user-facing error: one line that says what is wrong and how to fix it."""
