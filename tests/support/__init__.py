"""Test helpers: real servers on 127.0.0.1 (`servers`, `upstream`, `openbao_server`, ...) and
the in-process layer (`inprocess`). tests/conftest.py loads the fixtures with `pytest_plugins`."""
