"""hubconf.py: torch.hub.load from a local clone (source="local")."""
from __future__ import annotations

import torch

from models.mn.model import MN
from models.pretrained import REGISTRY
from tests.conftest import REPO


def test_every_registry_name_is_an_entrypoint():
    import hubconf
    assert all(callable(getattr(hubconf, name)) for name in REGISTRY)
    odd = torch.hub.load(str(REPO), "mn10_as_fc_s2221", source="local", pretrained=False)
    assert odd.head_type == "fully_convolutional"
    assert torch.hub.load(str(REPO), "mn40_as(2)", source="local", pretrained=False).embedding_dim == 960 * 4


def test_fresh_model_from_local_hub():
    model = torch.hub.load(str(REPO), "mn04_as", source="local", pretrained=False, num_classes=7)
    assert isinstance(model, MN) and model.num_classes == 7 and model.embedding_dim == 384
    dymn = torch.hub.load(str(REPO), "dymn04_as", source="local", pretrained=False)
    assert dymn.num_classes == 527


def test_pretrained_model_from_local_hub(mn04_checkpoint):
    model = torch.hub.load(str(REPO), "mn04_as", source="local", pretrained=True).eval()
    reference = torch.load(mn04_checkpoint, map_location="cpu", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    tuned = torch.hub.load(str(REPO), "mn04_as", source="local", num_classes=10)
    assert tuned.num_classes == 10 and tuned.classifier[5].out_features == 10
