"""Errors meant for the user: one line that names the file or key and what to do."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input or configuration. Entry points print the message alone and exit with code 2."""

    exit_code = 2


class CudaRequiredError(UsageError):
    """A feature that only exists on CUDA (bitsandbytes quantization, memory stats) was asked for without it."""
