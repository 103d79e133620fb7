"""The fit check: the part decoder, trained as the `proposals` stage trains it, fits its own targets.

Round 1's recipe (the shipped demo teacher's frozen backbone and pixel decoder, object-centric
crops, the stage's optimiser and schedule) on the objects of a few Parts World images, with their
part masks as the targets and no augmentation. After training, the best query of each target
part must overlap it with IoU >= 0.8 (median) — if the decoder cannot fit perfect targets on a
handful of objects, nothing later in the chain can work.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")

from partdistill.config import load_config  # noqa: E402
from partdistill.data.partsworld import PartsWorldConfig, render_image  # noqa: E402
from partdistill.evaluation.metrics import mask_iou  # noqa: E402
from partdistill.storage import mask_to_rle  # noqa: E402
from tests.conftest import DEMO_CONFIG  # noqa: E402

pytestmark = pytest.mark.slow


class _TeacherArtifact:
    """The `teacher` artifact interface prepare_training needs: the shipped demo teacher."""

    def __init__(self, mmdet_config):
        self._cfg = mmdet_config

    def file(self, name):
        assert name == "mmdet_config.py"
        return self._cfg


def test_round1_fits_its_own_targets(tmp_path):
    from PIL import Image

    from partdistill.models.part_model import predict_objects
    from partdistill.models.train_teacher import train
    from partdistill.stages.proposals import load_part_model, prepare_training, training_records
    from partdistill.stages.teacher import resolve_path
    from partdistill.storage import write_json_atomic

    cfg = load_config(DEMO_CONFIG, {"proposals.flip": False, "proposals.crop.scale_range": [1.0, 1.0],
                                    "proposals.max_iters": 200, "proposals.checkpoint_interval": 1000,
                                    "proposals.optimizer.lr": 1e-3})
    section = cfg["proposals"]
    world = PartsWorldConfig(images=8, seed=3, width=256, height=192)
    instances, parts = [], []
    for index in range(4):
        r = render_image(world, index)
        name = f"{index:06d}.png"
        Image.fromarray(r.image).save(tmp_path / name)
        for j, inst in enumerate(r.instances):
            if inst.mask.sum() < 0.05 * world.width * world.height:
                continue
            iid = index * 10 + j
            instances.append({"instance_id": iid, "image_id": index, "split": "train", "file_name": name,
                              "class_id": inst.category_id - 1, "rle": mask_to_rle(inst.mask)["counts"],
                              "area": int(inst.mask.sum()), "height": world.height, "width": world.width})
            parts += [{"instance_id": iid, "rle": mask_to_rle(pm)["counts"], "area": int(pm.sum()),
                       "height": world.height, "width": world.width} for _, pm in inst.parts if pm.sum() >= 16]
    assert 6 <= len(instances) <= 16
    records, skipped = training_records(instances, parts, tmp_path, ["train"], 0.05,
                                        section["crop"], tmp_path / "crops")
    assert len(records) == len(instances) and not skipped
    teacher = _TeacherArtifact(resolve_path(cfg["teacher"]["mmdet_config"]))
    ckpt = resolve_path(cfg["teacher"]["checkpoint"])
    rcfg, mcfg, fresh = prepare_training(section, teacher, records, tmp_path / "work", {}, ckpt)
    assert any("cls_embed" in k for k in fresh)
    result = train(rcfg)
    assert result["iters"] == 200 and np.mean(result["losses"][-20:]) < 0.5 * np.mean(result["losses"][:20])

    out = tmp_path / "model"
    out.mkdir()
    torch.save({"state_dict": result["state_dict"]}, out / "checkpoint.pth")
    write_json_atomic(out / "model.json", mcfg)
    write_json_atomic(out / "inference.json", {"crop": section["crop"]})

    class _Art:
        path = out

        @staticmethod
        def file(name):
            return out / name

    model = load_part_model(_Art())
    assert model.part_crop["size"] == section["crop"]["size"]
    ious = []
    for index in range(4):
        image = np.asarray(Image.open(tmp_path / f"{index:06d}.png").convert("RGB"))
        rendered = render_image(world, index)
        objs = [i for i in rendered.instances if i.mask.sum() >= 0.05 * world.width * world.height]
        for inst, pred in zip(objs, predict_objects(model, image, [i.mask for i in objs]), strict=True):
            binary = list((pred["masks"].numpy() > 0.5) & inst.mask[None])
            targets = [pm for _, pm in inst.parts if pm.sum() >= 16]
            ious += list(mask_iou(targets, binary).max(1))
    assert np.median(ious) >= 0.8, np.percentile(ious, [10, 25, 50, 75])
