"""Helpers shared by the test modules (imported as ``support.<module>``).

Test modules import these, never each other nor ``conftest``; the fixtures
that use them are in tests/conftest.py.
"""
