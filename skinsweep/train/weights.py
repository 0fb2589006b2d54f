"""Where a backbone's weights come from: the model hub, or a local file (see ``skinsweep.train.backbones``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from skinsweep.errors import BackboneError, first_line, short_list

if TYPE_CHECKING:
    from skinsweep.train.backbones import Backbone

__all__ = ["hub_download", "load_weights_file", "read_state_dict", "resolve_weights", "save_backbone_weights"]


def resolve_weights(name: str, weights: str | None, pretrained: bool) -> str:
    """``weights`` as ``Backbone.weights`` records it: "hub", "none" or an absolute file path.

    None is the backbone's default ("hub" when ``pretrained``, else "none"); "hub" is refused for a
    random-init test model and a path must name an existing file.
    """
    if weights is None:
        return "hub" if pretrained else "none"
    if weights == "hub" and not pretrained:
        raise BackboneError(
            f"backbone {name!r} is a random-init test model without hub weights; "
            "use weights='none' or weights=PATH to a local file"
        )
    if weights in ("hub", "none"):
        return weights
    if weights.startswith("hub:"):
        raise BackboneError(
            f"weights={weights!r} is not supported; put the open_clip pretrained tag in the name, "
            f"e.g. 'open_clip:ViT-B-32@openai', and use weights='hub'"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"weights={weights!r} for backbone {name!r} is neither 'hub', 'none' nor an existing file; "
            "pass a .safetensors or .pt state dict path"
        )
    return str(path.resolve())


@contextlib.contextmanager
def hub_download(name: str, source: str) -> Iterator[None]:
    """Turn a failed hub download into one BackboneError line; honour HF_HUB_OFFLINE set at runtime.

    huggingface_hub reads HF_HUB_OFFLINE once, at import; a notebook or test that sets it later
    would otherwise still wait ~45 s on network retries.
    """
    import huggingface_hub.constants as hf_constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError / OfflineModeIsEnabled, sockets
        why = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else type(e).__name__
        raise BackboneError(
            f"pretrained weights for backbone {name!r} ({source}) could not be downloaded or found in "
            f"the Hugging Face cache ({why}); pass weights=PATH to a local .safetensors/.pt file, or "
            "pre-populate the HF cache (HF_HOME), e.g. by creating it once online with HF_HUB_OFFLINE unset"
        ) from e
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch state dict (``weights_only=True``)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle / zip errors have no common base class
        kind = "safetensors" if path.endswith(".safetensors") else "torch state dict (weights_only=True)"
        reason = first_line(e)[:160]
        raise BackboneError(f"weights file {path} could not be read as a {kind}: {reason}") from e
    # training checkpoints often nest the weights: {"state_dict": {...}, "epoch": ...}
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict (a mapping of names to "
                            "tensors); save one with save_backbone_weights() or "
                            "torch.save(model.state_dict())")
    return dict(obj)


def load_weights_file(model: nn.Module, path: str, *, name: str, drop: tuple[str, ...] = ()) -> None:
    """Load ``path`` into ``model`` strictly, under the key prefix (``model.``, ``visual.`` ...) where it fits.

    ``drop``: key prefixes (e.g. timm's classifier ``"fc."``) whose tensors may be in the file but
    not in the feature extractor.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    # Count, for each candidate prefix, how many file keys become model keys once it is removed.
    votes: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in expected:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
    if not votes:
        raise BackboneError(
            f"weights file {path} does not fit backbone {name!r}: none of its {len(state)} keys "
            f"({short_list(state, 3)}) match the model's ({short_list(expected, 3)}); "
            "is it a checkpoint of this architecture?"
        )
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unexpected = [k for k in state if k not in expected and not k.startswith(drop)]
    # BatchNorm's counter is absent from many checkpoints and never affects outputs
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise BackboneError(
            f"weights file {path} does not fit backbone {name!r} (key prefix {prefix!r}): "
            f"{len(missing)} missing key(s) [{short_list(missing, 3)}], "
            f"{len(unexpected)} unexpected [{short_list(unexpected, 3)}], "
            f"{len(wrong)} shape mismatch(es) file vs model [{short_list(wrong, 2)}]; "
            "use a checkpoint of the same architecture and input_size (e.g. from save_backbone_weights())"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def save_backbone_weights(backbone: Backbone, path: str | Path) -> Path:
    """Write ``backbone.model``'s state dict to a ``.safetensors`` file (spec in the metadata)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BackboneError(f"save_backbone_weights writes safetensors; name the file *.safetensors, "
                            f"got {path}")
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors sharing storage (tied or viewed weights)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"skinsweep_backbone": json.dumps(backbone.spec())})
    return path
