"""geno-convert's error (light: the command line refuses bad arguments without importing torch)."""


class ConversionError(RuntimeError):
    """Input a converter refuses: the message names the file, tensor or setting at fault."""
