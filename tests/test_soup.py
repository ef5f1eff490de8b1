"""cartiq.segmentation.soup: the mean of trained runs' weights as a model package."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config, write_toy

from cartiq.errors import InputError
from cartiq.segmentation import average_checkpoints
from cartiq.segmentation.models import load_model
from cartiq.segmentation.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of the same network with different seeds, and one of another network."""
    root = tmp_path_factory.mktemp("soup")
    labels = root / "labels"
    write_toy(labels)
    out = {}
    for name, over in {"a": {"seed": 1}, "b": {"seed": 2, "epochs": 2},
                       "wide": {"network": {"name": "UNet", "spatial_dims": 2,
                                            "in_channels": 1, "out_channels": 10,
                                            "kwargs": {"channels": [6, 8], "strides": [2],
                                                       "num_res_units": 0}}}}.items():
        folder = root / name
        folder.mkdir()
        train(labels, folder / "run", config_path=tiny_config(folder, **over), progress=False)
        out[name] = folder / "run" / "checkpoints" / "last.pt"
    return out


def test_the_package_holds_the_mean_and_names_its_ingredients(runs, tmp_path):
    pkg = average_checkpoints([runs["a"], runs["b"]], tmp_path / "soup", names=["A", "B"])
    a = torch.load(runs["a"], weights_only=False)
    b = torch.load(runs["b"], weights_only=False)
    assert not torch.equal(a["model"]["model.0.conv.weight"], b["model"]["model.0.conv.weight"])
    net = load_model(pkg).network  # checks the sha256 written into metadata.json
    for name, value in net.state_dict().items():
        expected = (a["model"][name].double() + b["model"][name].double()) / 2
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-7)
    training = json.loads((pkg / "metadata.json").read_text())["training"]
    ingredients = training["averaged_from"]
    assert [i["run"] for i in ingredients] == ["A", "B"]
    assert [i["seed"] for i in ingredients] == [1, 2]
    assert [i["steps"] for i in ingredients] == [3, 6]
    assert [i["epochs"] for i in ingredients] == [1, 2]
    assert ingredients[0]["weights_sha256"] != ingredients[1]["weights_sha256"]
    assert training["config"]["seed"] == 1  # the first checkpoint's configuration


def test_a_checkpoint_of_another_network_is_refused_by_name(runs, tmp_path):
    with pytest.raises(InputError, match=r"last\.pt.*network differs"):
        average_checkpoints([runs["a"], runs["wide"]], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()  # nothing written


def test_not_a_checkpoint_and_too_few(runs, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt.*not a cartiq training checkpoint"):
        average_checkpoints([runs["a"], junk], tmp_path / "soup")
    with pytest.raises(InputError, match="at least two"):
        average_checkpoints([runs["a"]], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()
