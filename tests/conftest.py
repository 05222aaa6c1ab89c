import pytest

from helpers import render


@pytest.fixture(scope="session")
def default_project(tmp_path_factory):
    return render(tmp_path_factory.mktemp("default"))
