"""Shared fixtures of the evaluation tests: one extractor cache per test session."""

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A cache dir shared by the session, so each domain extractor trains once."""
    return tmp_path_factory.mktemp("dpfed_cache")
