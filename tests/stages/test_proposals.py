"""Stage `proposals`: the part decoder's training rounds on the tiny run, labelling, resume, bad input."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from partdistill.pipeline import plan, run_pipeline
from partdistill.stages import proposals
from partdistill.stages.proposals import NoTrainingData, carry_over, label_image, training_records
from partdistill.storage import ArtifactStore, mask_to_rle, rle_to_mask
from tests.stages.test_mining import _linked_store as linked_store

UPSTREAM = ("data", "teacher", "instances", "features", "mining")
# A tiny decoder that trains a few iterations: these tests check the plumbing, not quality.
# Ground-truth objects (the 3-iteration teacher finds nothing reliable) and no CRF, for speed.
OPTIONS = {"proposals.rounds": 2, "instances.source": "gt", "mining.crf.enabled": False,
           "proposals.num_queries": 8, "proposals.num_points": 256, "proposals.max_iters": 4, "proposals.batch_size": 2,
           "proposals.checkpoint_interval": 2, "proposals.image_size": [96, 128],
           "proposals.label.score_threshold": 0.0, "proposals.label.mask_threshold": 0.2,
           # a 4-iteration decoder's queries cover whole objects: keep them (the guard is tested on its own)
           "proposals.label.max_fraction": 1.0, "proposals.optimizer.lr": 1e-4,
           "proposals.label.shard_images": 4,
           # round 2 of the fixture trains on the pseudo-parts alone: carry-over has its own test
           "proposals.carry_over_iou": None}


def _cfg(cfg, **options):
    cfg = copy.deepcopy(cfg)
    for key, value in {**OPTIONS, **options}.items():
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


def _linked_store(tmp_path, store: ArtifactStore) -> ArtifactStore:
    return linked_store(tmp_path, store, UPSTREAM)


@pytest.fixture(scope="module")
def two_rounds(tiny_run):
    cfg, store, _ = tiny_run
    cfg = _cfg(cfg)
    outcomes = {o.stage: o for o in run_pipeline(cfg, store, until="proposals")}
    return cfg, store, outcomes


def test_two_rounds_write_their_artifacts(two_rounds):
    cfg, store, outcomes = two_rounds
    instances = {r["instance_id"]: r for r in pq.read_table(
        store.open("instances", outcomes["instances"].version).path / "instances").to_pylist()}
    previous = None
    for r in (1, 2):
        out = outcomes[f"proposals_r{r}"]
        art = store.open(f"proposals_r{r}", out.version)
        assert {"checkpoint.pth", "model.json", f"pseudo_parts_r{r}.parquet", "skipped.parquet", "metrics.json",
                "losses.json", "loss.png", "pseudo_parts.png"} <= set(art.files)
        if previous is None:
            assert "proposals_r1" not in art.manifest["inputs"]
        else:  # round 2 reads round 1, which is the teacher of its self-training
            assert art.manifest["inputs"]["proposals_r1"] == previous
        previous = out.version
        table = pq.read_table(art.file(f"pseudo_parts_r{r}.parquet"))
        assert table.schema == proposals.PSEUDO_SCHEMA and table.num_rows > 0
        metrics = json.loads(art.file("metrics.json").read_text())
        assert metrics["round"] == r and metrics["pseudo_parts"]["parts"] == table.num_rows
        assert metrics["train"]["iters"] == 4 and len(json.loads(art.file("losses.json").read_text())) == 4
        assert metrics["train"]["images"] > 0 and metrics["train"]["instances_used"] > 0
        by_instance: dict[int, np.ndarray] = {}
        for row in table.to_pylist():
            inst = instances[row["instance_id"]]
            obj = rle_to_mask({"size": [inst["height"], inst["width"]], "counts": inst["rle"]})
            seg = rle_to_mask({"size": [row["height"], row["width"]], "counts": row["rle"]})
            assert not (seg & ~obj).any(), "a pseudo-part leaves its object"
            union = by_instance.setdefault(row["instance_id"], np.zeros_like(obj))
            assert not (seg & union).any(), "pseudo-parts of one object overlap"
            union |= seg
            assert int(seg.sum()) == row["area"] >= 0.05 * obj.sum()
            assert len(row["feature"]) == 128 and 0.0 <= row["score"] <= 1.0
            assert row["split"] == inst["split"] and row["image_id"] == inst["image_id"]
        assert {instances[i]["split"] for i in by_instance} == {"train", "val"}, "every split is labelled"
        assert out.summary["round"] == r and out.summary["pseudo_parts"] == table.num_rows


def test_more_rounds_keep_the_finished_ones(two_rounds):
    cfg, _, outcomes = two_rounds
    three = {p.name: p.version for p in plan(_cfg(cfg, **{"proposals.rounds": 3}))}
    assert three["proposals_r1"] == outcomes["proposals_r1"].version
    assert three["proposals_r2"] == outcomes["proposals_r2"].version
    assert "proposals_r3" in three
    # downstream stages read the last round
    ranking = next(p for p in plan(_cfg(cfg, **{"proposals.rounds": 3})) if p.name == "ranking")
    assert ranking.inputs["proposals_r3"] == three["proposals_r3"]
    assert ranking.input_keys["proposals_r3"] == "proposals"


def test_carry_over_keeps_the_targets_a_round_missed(two_rounds, tmp_path):
    """carry_over_iou: round 2 trains on round 1's pseudo-parts plus the mined parts none of them
    found; round 3 carries from round 2's targets; round 1 keeps its version."""
    cfg, store, outcomes = two_rounds
    carry = _cfg(cfg, **{"proposals.carry_over_iou": 0.5, "proposals.rounds": 3})
    versions = {p.name: p.version for p in plan(carry)}
    assert versions["proposals_r1"] == outcomes["proposals_r1"].version, "the key only matters from round 2"
    assert versions["proposals_r2"] != outcomes["proposals_r2"].version
    other = linked_store(tmp_path, store, (*UPSTREAM, "proposals_r1"))
    done = {o.stage: o for o in run_pipeline(carry, other, until="proposals")}
    columns = proposals.TARGET_COLUMNS
    mined = pq.read_table(store.open("mining", outcomes["mining"].version).path / "mined_parts").select(columns)
    previous = mined.to_pylist()
    for r in (2, 3):
        prev_name = f"proposals_r{r - 1}"
        pseudo = pq.read_table(other.open(prev_name, done.get(prev_name, outcomes[prev_name]).version)
                               .file(f"pseudo_parts_r{r - 1}.parquet")).select(columns).to_pylist()
        art = other.open(f"proposals_r{r}", done[f"proposals_r{r}"].version)
        targets = pq.read_table(art.file(proposals.TARGETS_FILE))
        assert targets.schema == proposals.TARGET_SCHEMA
        rows = targets.to_pylist()
        assert rows[:len(pseudo)] == pseudo, "every pseudo-part is a target"
        carried = rows[len(pseudo):]
        assert all(c in previous for c in carried)
        # a carried target overlaps no pseudo-part of its instance at IoU >= 0.5; a dropped one does
        found = {}
        for p in pseudo:
            found.setdefault(p["instance_id"], []).append(rle_to_mask({"size": [p["height"], p["width"]],
                                                                       "counts": p["rle"]}))
        for t in previous:
            m = rle_to_mask({"size": [t["height"], t["width"]], "counts": t["rle"]})
            best = max(((m & f).sum() / max((m | f).sum(), 1) for f in found.get(t["instance_id"], [])), default=0.0)
            assert (t in carried) == (best < 0.5)
        previous = rows


def test_carry_over_rule():
    h, w = 8, 8
    def rle(m):
        return mask_to_rle(m)["counts"]
    a = np.zeros((h, w), bool)
    a[:, :4] = True
    b = ~a
    top = np.zeros((h, w), bool)
    top[:4, :3] = True
    row = lambda inst, m: {"instance_id": inst, "rle": rle(m), "area": int(m.sum()), "height": h, "width": w}  # noqa: E731
    pseudo = [row(1, a)]
    previous = [row(1, a), row(1, b), row(1, top), row(2, a)]
    out = carry_over(pseudo, previous, 0.5)
    # a is found (IoU 1); b does not overlap; top overlaps a at IoU 12/32 < 0.5; instance 2 has no pseudo-part
    assert out == [row(1, a), row(1, b), row(1, top), row(2, a)]
    assert carry_over(pseudo, previous, 0.3) == [row(1, a), row(1, b), row(2, a)], "top's IoU 0.375 >= 0.3"
    assert carry_over([], previous, 0.5) == previous


def test_resume_after_a_kill(two_rounds, tmp_path):
    """SIGKILL the training after its first checkpoint; the rerun resumes from it and reports the
    whole loss curve."""
    cfg, store, _ = two_rounds
    other = _linked_store(tmp_path, store)
    # long enough that the kill lands mid-training on a fast machine too
    cfg = _cfg(cfg, **{"proposals.max_iters": 60, "proposals.seed": 1})
    version = next(p.version for p in plan(cfg) if p.name == "proposals_r1")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    code = ("import json, sys; from partdistill.pipeline import run_pipeline; from partdistill.storage import "
            "ArtifactStore; run_pipeline(json.load(open(sys.argv[1])), ArtifactStore(sys.argv[2]), "
            "only='proposals_r1')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg_file), str(other.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = other.partial_path("proposals_r1", version) / "work" / "runner" / "last_checkpoint"
    deadline = time.monotonic() + 300
    try:
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last.exists(), "training never wrote a checkpoint"
    assert not other.is_complete("proposals_r1", version)

    out = {o.stage: o for o in run_pipeline(cfg, other, only="proposals_r1")}["proposals_r1"]
    art = other.open("proposals_r1", out.version)
    meta = json.loads(art.file("metrics.json").read_text())
    assert meta["train"]["iters"] == 60 and 2 <= out.summary["resumed_from"] < 60
    assert len(json.loads(art.file("losses.json").read_text())) == 60
    assert "work/runner/last_checkpoint" not in art.files, "training checkpoints are removed on commit"
    ckpt_meta = __import__("torch").load(art.file("checkpoint.pth"), weights_only=True)["meta"]
    assert ckpt_meta["iters"] == 60


def test_resume_records_the_iteration(two_rounds, tmp_path):
    """The same kill, checked through what the stage records: the run resumed mid-training."""
    cfg, store, _ = two_rounds
    other = _linked_store(tmp_path, store)
    cfg = _cfg(cfg, **{"proposals.max_iters": 6, "proposals.seed": 2})
    from partdistill.models import train_teacher

    real = train_teacher.train

    def dies_after_first_checkpoint(rcfg, on_iter=None, device="cpu"):
        def report(i, loss):
            on_iter(i, loss)
            if i == 3:
                raise RuntimeError("killed")
        return real(rcfg, on_iter=report, device=device)

    train_teacher.train = dies_after_first_checkpoint
    try:
        with pytest.raises(RuntimeError, match="killed"):
            run_pipeline(cfg, other, only="proposals_r1")
    finally:
        train_teacher.train = real
    out = {o.stage: o for o in run_pipeline(cfg, other, only="proposals_r1")}["proposals_r1"]
    train_meta = out.summary
    assert train_meta["iters"] == 6
    art = other.open("proposals_r1", out.version)
    assert len(json.loads(art.file("losses.json").read_text())) == 6
    assert out.summary["resumed_from"] == 2  # a fact of the run: in the manifest, not in the files


def test_no_usable_instance_fails_clearly(two_rounds, tmp_path):
    cfg, store, _ = two_rounds
    other = _linked_store(tmp_path, store)
    cfg = _cfg(cfg, **{"proposals.min_object_fraction": 0.99})
    with pytest.raises(NoTrainingData, match="no usable instance.*object under min_object_fraction"):
        run_pipeline(cfg, other, only="proposals_r1")
    assert not list((other.root / "proposals_r1").glob("[!.]*")), "nothing committed"


def _inst(iid, mask, split="train"):
    return {"instance_id": iid, "image_id": iid // 1000, "split": split, "file_name": f"{iid // 1000}.png",
            "area": int(mask.sum()), "height": mask.shape[0], "width": mask.shape[1],
            "rle": mask_to_rle(mask)["counts"]}


def test_training_records_filter_and_count(tmp_path):
    h, w = 20, 20
    big = np.zeros((h, w), bool)
    big[2:18, 2:18] = True
    small = np.zeros((h, w), bool)
    small[0, 0:10] = True  # 10 px = 2.5% of the image
    lonely = np.zeros((h, w), bool)
    lonely[5:15, 5:15] = True
    top, bottom = big.copy(), big.copy()
    top[10:] = False
    bottom[:10] = False
    instances = [_inst(1000, big), _inst(1001, small), _inst(2000, lonely), _inst(3000, big, split="val")]
    parts = [{"instance_id": 1000, "part": i, "rle": mask_to_rle(m)["counts"], "area": int(m.sum()), "height": h,
              "width": w} for i, m in enumerate((top, bottom))]
    parts.append({"instance_id": 1001, "part": 0, "rle": mask_to_rle(small)["counts"], "area": 10, "height": h,
                  "width": w})
    records, skipped = training_records(instances, parts, tmp_path, ["train"], 0.05)
    assert [r["img_id"] for r in records] == [1]
    assert [i["bbox"] for i in records[0]["instances"]] == [[2.0, 2.0, 18.0, 10.0], [2.0, 10.0, 18.0, 18.0]]
    assert records[0]["img_path"] == str(tmp_path / "1.png")
    reasons = {s["instance_id"]: s["reason"] for s in skipped}
    assert reasons[1001].startswith("object under min_object_fraction") and reasons[2000] == "no parts"
    assert 3000 not in reasons, "other splits are neither used nor counted as skipped"


def test_label_image_by_iou_and_confidence():
    h, w = 10, 20
    left = np.zeros((h, w), bool)
    left[:, :10] = True
    right = ~left
    masks = np.zeros((4, h, w), np.float32)
    masks[0][:, :10] = 0.9           # left object, top half beaten by query 1 below
    masks[1][:5, :10] = 1.0
    masks[2][:, 8:] = 0.8            # mostly right: goes to the right object by IoU
    masks[3][:, :] = 0.7             # scores too low
    scores = np.array([0.9, 0.85, 0.6, 0.1], np.float32)  # top half: 1.0 * 0.85 > 0.9 * 0.9
    found = label_image(masks, scores, [left, right], score_threshold=0.3)
    left_q = {q: seg for q, seg in found[0]}
    right_q = {q: seg for q, seg in found[1]}
    assert set(left_q) == {0, 1} and set(right_q) == {2}
    assert left_q[1][:5, :10].all() and not left_q[0][:5].any() and left_q[0][5:, :10].all()
    assert right_q[2].sum() == right.sum() and not (right_q[2] & left).any()
    assert label_image(masks, scores, [], 0.3) == []
