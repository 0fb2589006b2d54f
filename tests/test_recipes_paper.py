"""sweeps/paper.yaml describes the reference study's three runs exactly."""

from __future__ import annotations

from pathlib import Path

import yaml

from skinsweep.train.backbones import create_backbone
from skinsweep.train.loop import parse_config

PAPER = Path(__file__).resolve().parents[1] / "sweeps" / "paper.yaml"


def test_paper_recipe_is_the_reference_study():
    recipe = yaml.safe_load(PAPER.read_text())
    cfgs = [parse_config({**recipe["trial"], **t, "data": recipe["data"]["root"]}, source=str(PAPER))
            for t in recipe["trials"]]
    assert [c.backbone for c in cfgs] == ["resnet18", "dino_vits16", "clip_vitb32"]
    for c in cfgs:
        assert (c.mode, c.loss, c.pos_weight, c.optimizer, c.lr, c.batch_size, c.epochs) == (
            "finetune", "bce", 8.0, "adam", 1e-4, 32, 20)
    assert recipe["split"]["fractions"] == [0.70, 0.15, 0.15]
    # heads and input sizes as in the study: linear, linear, MLP; 224 px everywhere
    heads = {}
    for c in cfgs:
        bb = create_backbone(c.backbone, weights="none")
        heads[c.backbone] = bb.default_head
        assert bb.data_config.input_size == 224
    assert heads == {"resnet18": "linear", "dino_vits16": "linear", "clip_vitb32": "mlp"}
