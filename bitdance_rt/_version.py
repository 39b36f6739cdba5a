"""The package version: a leaf module, so submodules can read it without importing the package API."""

__version__ = "0.1.0"
