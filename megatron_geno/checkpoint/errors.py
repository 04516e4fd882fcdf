"""The checkpoint error (light: importable without torch or megatron-core)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, unsafe or does not match the model."""
