"""sweeps/paper.yaml describes the reference study's three runs exactly: asked of the loaded recipe,
i.e. the TrialConfigs the sweep will run, not the YAML merged by hand."""

from __future__ import annotations

from pathlib import Path

from skinsweep.sweep.recipe import load_recipe
from skinsweep.train.backbones import create_backbone

PAPER = Path(__file__).resolve().parents[1] / "sweeps" / "paper.yaml"


def test_paper_recipe_is_the_reference_study():
    recipe = load_recipe(PAPER)
    cfgs = [recipe.trial_config(p) for p in recipe.explicit_points()]
    assert recipe.num_samples == 3 and [c.backbone for c in cfgs] == ["resnet18", "dino_vits16", "clip_vitb32"]
    for c in cfgs:
        assert (c.mode, c.loss, c.pos_weight, c.optimizer, c.lr, c.batch_size, c.epochs, c.weights, c.seed) == (
            "finetune", "bce", 8.0, "adam", 1e-4, 32, 20, "hub", 0)
    assert recipe.split_args()["fractions"] == (0.70, 0.15, 0.15)
    assert recipe.scheduler.type == "none"  # every run trains all its epochs, as in the study
    # heads and input sizes as in the study: linear, linear, MLP; 224 px everywhere
    heads = {}
    for c in cfgs:
        bb = create_backbone(c.backbone, weights="none")
        heads[c.backbone] = bb.default_head
        assert bb.data_config.input_size == 224 and c.image_size is None and c.head == "auto"
    assert heads == {"resnet18": "linear", "dino_vits16": "linear", "clip_vitb32": "mlp"}
