"""The token store's two errors: bad input or corpus state, and damaged shard files."""


class PipelineError(ValueError):
    """A problem with the corpus directory or a previous run; the message says what to do."""


class ShardError(ValueError):
    """A damaged or missing shard file; the message names the file (and chunk)."""
