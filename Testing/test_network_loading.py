"""Weights load safely: state dicts with weights_only, TorchScript, sha256 checks, refusal of pickles."""

from __future__ import annotations

import hashlib
import pickle
import warnings

import pytest
import torch
from cardfactory import card_dict, write_card

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.errors import ModelError
from medautolabel.runtime import network

torch.set_num_threads(1)


class Payload:
    """Stands in for an arbitrary object a malicious or careless checkpoint would carry."""

    def __init__(self) -> None:
        self.note = "not a tensor"


class RunsCode:
    """Unpickling this would run a command (it must never be unpickled)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file proves code ran


def folder_with(tmp_path, weights: str = "model.pt", **network_fields):
    d = card_dict()
    d["network"].update(weights=weights, **network_fields)
    write_card(tmp_path, d)
    return ModelCard.load(tmp_path)


@pytest.fixture(autouse=True)
def fresh_cache():
    network.clear_cache()
    yield
    network.clear_cache()


def reference(card: ModelCard) -> torch.nn.Module:
    torch.manual_seed(1)
    return network.build_network(card).eval()


def test_state_dict_loads_and_computes_the_same(tmp_path):
    card = folder_with(tmp_path)
    ref = reference(card)
    torch.save(ref.state_dict(), card.weights_path)
    net = network.load_network(card, torch.device("cpu"))
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert network.load_network(card, torch.device("cpu")) is net  # cached


def test_float16_wrapped_and_dataparallel_state_dicts_load(tmp_path):
    card = folder_with(tmp_path)
    ref = reference(card)
    half = {f"module.{k}": (v.half() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    torch.save({"state_dict": half, "epoch": 3}, card.weights_path)
    net = network.load_network(card, torch.device("cpu"))
    assert next(net.parameters()).dtype == torch.float32
    x = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=2e-2, rtol=2e-2)


def test_pickled_custom_object_is_refused(tmp_path):
    card = folder_with(tmp_path)
    torch.save({"weight": torch.zeros(2), "extra": Payload()}, card.weights_path)
    with pytest.raises(ModelError, match="refused: the weights file needs unpickling arbitrary Python objects") as e:
        network.load_network(card, torch.device("cpu"))
    assert str(e.value).startswith(str(card.weights_path))


def test_code_running_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    card = folder_with(tmp_path)
    with open(card.weights_path, "wb") as f:
        pickle.dump({"w": RunsCode(str(marker))}, f, protocol=2)
    with pytest.raises(ModelError, match="refused"):
        network.load_network(card, torch.device("cpu"))
    assert not marker.exists()


def test_sha256_mismatch_is_refused_and_match_accepted(tmp_path):
    card = folder_with(tmp_path, sha256="0" * 64)
    torch.save(reference(card).state_dict(), card.weights_path)
    with pytest.raises(ModelError, match="sha256 of the weights is .* but the model card says 0000"):
        network.load_network(card, torch.device("cpu"))
    good = hashlib.sha256(card.weights_path.read_bytes()).hexdigest()
    assert network.file_sha256(card.weights_path) == good
    card = folder_with(tmp_path, sha256=good.upper())
    network.load_network(card, torch.device("cpu"))


def test_changed_file_is_reloaded(tmp_path):
    card = folder_with(tmp_path)
    torch.save(reference(card).state_dict(), card.weights_path)
    first = network.load_network(card, torch.device("cpu"))
    torch.manual_seed(2)
    torch.save(network.build_network(card).state_dict(), card.weights_path)
    second = network.load_network(card, torch.device("cpu"))
    assert second is not first


def scripted(path):
    torch.manual_seed(3)
    module = torch.nn.Conv3d(2, 4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return module


@pytest.mark.parametrize("architecture", ["TorchScript", "UNet"])
def test_torchscript_loads(tmp_path, architecture):
    card = folder_with(tmp_path, weights="model.ts", architecture=architecture)
    module = scripted(card.weights_path)
    assert network.is_torchscript(card.weights_path)
    net = network.load_network(card, torch.device("cpu"))
    x = torch.rand(1, 2, 5, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(net(x), module(x))


def test_torchscript_card_with_a_state_dict_is_refused(tmp_path):
    card = folder_with(tmp_path, architecture="TorchScript")
    torch.save({"w": torch.zeros(1)}, card.weights_path)
    with pytest.raises(ModelError, match="not a TorchScript archive"):
        network.load_network(card, torch.device("cpu"))


def test_weights_that_do_not_fit_the_card(tmp_path):
    card = folder_with(tmp_path)
    other = card_dict()
    other["network"]["parameters"]["channels"] = [8, 16]
    torch.save(network.build_network(ModelCard.from_dict(other)).state_dict(), card.weights_path)
    with pytest.raises(ModelError, match="weights do not fit the UNet the model card describes"):
        network.load_network(card, torch.device("cpu"))
    torch.save({"a.weight": torch.zeros(1)}, card.weights_path)
    with pytest.raises(ModelError, match=r"do not fit .* missing, 1 unexpected"):
        network.load_network(card, torch.device("cpu"))
    torch.save([1, 2, 3], card.weights_path)
    with pytest.raises(ModelError, match="holds no state dict"):
        network.load_network(card, torch.device("cpu"))


def test_missing_and_damaged_files(tmp_path):
    card = folder_with(tmp_path)
    with pytest.raises(ModelError, match="weights file not found"):
        network.load_network(card, torch.device("cpu"))
    torch.save(reference(card).state_dict(), card.weights_path)
    data = card.weights_path.read_bytes()
    card.weights_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read the weights"):
        network.load_network(card, torch.device("cpu"))


def test_bad_network_parameters_name_the_field(tmp_path):
    d = card_dict()
    d["network"]["parameters"]["colour"] = 3
    path = write_card(tmp_path, d)
    with pytest.raises(ModelError, match="field 'network.parameters': MONAI UNet rejects them") as e:
        network.build_network(ModelCard.load(path))
    assert e.value.path == str(path)


@pytest.mark.parametrize("architecture,parameters", [
    ("SegResNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 4, "init_filters": 8,
                   "blocks_down": [1, 1], "blocks_up": [1]}),
    ("DynUNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 4, "kernel_size": [3, 3, 3],
                 "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]}),
    ("BasicUNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 4, "features": [4, 4, 4, 4, 4, 4],
                   "norm": "batch"}),
])
def test_other_monai_architectures_build(architecture, parameters):
    d = card_dict()
    d["network"].update(architecture=architecture, parameters=parameters)
    net = network.build_network(ModelCard.from_dict(d)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 2, 16, 16, 16)).shape == (1, 4, 16, 16, 16)
