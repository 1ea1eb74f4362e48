"""The one version string. Its own module so that code inside the package reads it without
importing the package facade (`compact_search/__init__.py`), and setuptools reads it statically
(pyproject.toml: dynamic version)."""

__version__ = "0.1.0"
