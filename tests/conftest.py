"""Imports hypothesis before any test imports torch: torch._dynamo raises the recursion limit at
import, and CPython 3.11 then fails pytest's assertion rewriting of hypothesis when hypothesis's
pytest plugin imports it late ("AST constructor recursion depth mismatch" at session end)."""

import hypothesis  # noqa: F401
