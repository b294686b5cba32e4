"""mongoproxy: an asyncio MongoDB wire-protocol proxy."""

# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic]), `mongoproxy --version` and the build_info metric show it.
__version__ = "0.1.0"
