"""Exceptions raised for bad user input.

Every error names what is wrong (file, row, site, round or parameter) so a hospital's
engineer can fix the input without reading a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input data or parameters; the message names the file, row or parameter."""
