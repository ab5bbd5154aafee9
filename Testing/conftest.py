import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# developer tools (the benchmark harness, the built-in model's recipe and evaluation) are not shipped
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


@pytest.fixture(autouse=True, scope="session")
def _private_model_cache(tmp_path_factory):
    """Compiled networks (openvino_graph) go to a folder of this test session, never the user's cache."""
    old = os.environ.get("MEDAUTOLABEL_CACHE")
    os.environ["MEDAUTOLABEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if old is None:
        os.environ.pop("MEDAUTOLABEL_CACHE", None)
    else:
        os.environ["MEDAUTOLABEL_CACHE"] = old
