"""The version of unidask, in a module of its own: every module reads it without importing the package."""

__version__ = "0.1.0"
