"""The batched parts of a run: costly metrics of all pairs at once equal the one-pair path, the IG
sample of ``--ig-per-pathology``, the image prefetcher, and the plan and estimate told before
the work starts."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch

from audit.config import build_settings
from audit.data.preprocess import preprocess
from audit.metrics import fidelity, randomization, repeatability
from audit.metrics.sampling import stratified_sample
from audit.model import load_model
from audit.run import estimate, plan
from audit.run.batch import audit_batch
from audit.run.costly import CostlyPair, costly_metrics
from audit.run.images import (
    MAX_DECODE_THREADS,
    PREFETCH_MIN_BATCHES,
    ImagePrefetcher,
    LoadedImage,
    ProcessPrefetcher,
    ThreadPrefetcher,
    auto_workers,
    decode_threads,
    image_prefetcher,
    load_batch_images,
    submit_next,
    thumbnail_png,
)
from audit.saliency import explain_all, get_method
from audit.store.rundir import read_table

SIZE = 64  # model input: small, so the cascade with IG stays quick


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(random_init=True, seed=0, device="cpu")


def _settings(**overrides):
    values = {"manifest": "m.csv", "random_init": True, "methods": ["gradcam", "gradcampp"],
              "baselines": [], "metrics": ["localization"], "progress": False,
              "image_size": SIZE}
    values.update(overrides)
    return build_settings(values, {})


def _pairs(model, settings) -> list[CostlyPair]:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:80, 0:96]
    pairs = []
    for i, finding in enumerate(["Mass", "Effusion", "Mass"]):
        # a bright blob on a ramp: maps with structure (a flat map's min-max normalization,
        # used by SSIM and HOG, would magnify float32 rounding)
        blob = np.exp(-((xx - 20 - 25 * i) ** 2 + (yy - 30 - 10 * i) ** 2) / 150.0)
        pixels = (40 + 1.2 * xx + 150 * blob + rng.normal(0, 3, xx.shape)).clip(0, 255)
        pixels = pixels.astype(np.float32)
        pre = preprocess(pixels, SIZE, (0.0, 255.0))
        item = LoadedImage(key=f"img{i}", pre=pre, thumb_png=b"")
        target = [[model.finding_index(finding)]]
        results = explain_all(model, pre.tensor[None], target, settings.methods,
                              **settings.saliency_options())
        boxes = np.array([[10.0, 12.0, 20.0, 18.0]])
        pairs.append(CostlyPair(item, finding, results, dict.fromkeys(settings.methods, 0),
                                boxes, 3.0))
    return pairs


def _one_pair_path(model, pair: CostlyPair, method: str, settings) -> dict[str, float]:
    """The costly figures as the code before batching computed them: one pair and one method
    at a time."""
    options = settings.saliency_options()
    explainer = get_method(method, **options)
    x = pair.item.tensor[None]
    out = model.finding_index(pair.finding)

    def explain_fn(net, images, targets):
        return explainer.explain(model.with_net(net), images, targets).maps.numpy()

    original = pair.original(method)
    cascade = randomization.cascading_randomization(
        model.net, x, torch.tensor([[out]]), explain_fn, seed=settings.seed,
        blocks=settings.randomization_blocks, original_maps=original[None, None])
    figures = randomization.randomization_figures(cascade)
    figures.update(repeatability.repeatability_figures(
        explain_fn=explain_fn, net=model.net, image=pair.item.tensor, target=out,
        original_map=original, boxes=pair.boxes, threshold=settings.threshold,
        tolerance_px=pair.tolerance_px, noise_sigma=settings.noise_sigma * 2048.0,
        shift_px=settings.shift_px, seed=settings.seed))
    for order in ("saliency", "random"):
        curve = fidelity.deletion_insertion_curves(
            lambda b: model.probabilities(b)[:, out], x[0], original,
            step_fraction=settings.fidelity_step, baseline=settings.fidelity_baseline,
            order=order, seed=settings.seed, batch_size=settings.fidelity_batch_size)
        figures.update(curve.figures())
    return figures


@pytest.mark.parametrize("methods", [
    ["gradcam", "gradcampp"],
    pytest.param(["gradcam", "integrated_gradients"], marks=pytest.mark.slow),  # IG: ~15 s
], ids=["cam", "with_ig"])
def test_costly_metrics_of_a_batch_equal_the_one_pair_path(model, methods):
    settings = _settings(methods=methods,
                         metrics=["localization", "repeatability", "randomization",
                                  "fidelity"], ig_steps=2,
                         randomization_blocks=["classifier", "features.denseblock4"],
                         fidelity_step=0.1, fidelity_batch_size=7)
    pairs = _pairs(model, settings)
    figures, curves = costly_metrics(model, pairs, settings)
    for pair in pairs:
        for method in settings.methods:
            want = _one_pair_path(model, pair, method, settings)
            got = figures[(pair.item.key, pair.finding, method)]
            assert set(got) == set(want), method
            for name, value in want.items():
                # The maps differ by float32 rounding of other batch compositions only (below
                # 5e-7 of each map's max, measured). HOG normalizes each block to unit norm
                # (L2-Hys), so in near-flat cells of a randomized map that rounding turns into
                # other gradient orientations: measured up to 3e-3 on these images.
                loose = name.endswith("hog_similarity")
                assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-2 if loose else 1e-5
                                                  ), (method, name)
    table = pd.DataFrame(curves)
    per = table.groupby(["image_key", "finding", "method"]).size()
    assert len(per) == len(pairs) * len(methods) and per.nunique() == 1


def test_the_equality_check_fails_on_the_figures_of_another_pair(model):
    settings = _settings(metrics=["localization", "fidelity"], fidelity_step=0.25)
    pairs = _pairs(model, settings)
    figures, _ = costly_metrics(model, pairs, settings)
    other = _one_pair_path_fidelity(model, pairs[1], "gradcam", settings)
    got = figures[("img0", "Mass", "gradcam")]["fidelity_deletion_auc"]
    assert got != pytest.approx(other, rel=1e-4, abs=1e-5)


def _one_pair_path_fidelity(model, pair: CostlyPair, method: str, settings) -> float:
    out = model.finding_index(pair.finding)
    return fidelity.deletion_insertion_curves(
        lambda b: model.probabilities(b)[:, out], pair.item.tensor, pair.original(method),
        step_fraction=settings.fidelity_step, baseline=settings.fidelity_baseline,
        seed=settings.seed).deletion_auc


def _manifest() -> pd.DataFrame:
    rows = []
    for i in range(6):
        for finding in (["Mass", "Effusion"] if i % 2 else ["Mass"]):
            rows.append({"image_key": f"k{i}", "model_finding": finding, "finding": finding,
                         "box_x": 1.0, "box_index": 0})
    rows.append({"image_key": "k9", "model_finding": None, "finding": None, "box_x": np.nan,
                 "box_index": np.nan, "labels": "Mass|Edema"})
    return pd.DataFrame(rows)


def test_ig_sample_is_the_documented_stratified_draw_of_boxed_pairs():
    settings = _settings(methods=["gradcam", "integrated_gradients"], ig_per_pathology=2,
                         seed=7)
    manifest = _manifest()
    got = plan.ig_pairs(manifest, settings)
    pairs = (manifest.dropna(subset=["box_x"])[["image_key", "model_finding"]]
             .drop_duplicates().reset_index(drop=True))
    drawn = stratified_sample(pairs, 2, "model_finding", seed=7 + plan.IG_SEED_OFFSET,
                              sort_by=["image_key"])
    want = sorted(zip(drawn["image_key"], drawn["model_finding"], strict=True))
    assert got == want and len(got) == 4
    assert sum(f == "Mass" for _, f in got) == 2 and sum(f == "Effusion" for _, f in got) == 2
    assert plan.ig_pairs(manifest, _settings(ig_per_pathology=2)) is None  # no IG: no sample
    assert plan.ig_pairs(manifest, _settings(methods=["integrated_gradients"])) is None


def test_costly_pairs_are_drawn_within_the_ig_sample():
    settings = _settings(methods=["gradcam", "integrated_gradients"], ig_per_pathology=1,
                         metrics=["localization", "fidelity"], costly_per_pathology=5)
    manifest = _manifest()
    ig = plan.ig_pairs(manifest, settings)
    costly = plan.costly_pairs(manifest, settings, within=ig)
    assert costly and set(costly) <= set(ig)
    assert len(plan.costly_pairs(manifest, settings)) > len(costly)  # without: all 9 pairs


def test_batch_with_an_ig_sample_scores_ig_on_the_sample_and_cam_everywhere(
        model, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8)).save(
            images / f"a{i}.png")
        for finding in ("Mass", "Effusion"):
            rows.append({"image_key": f"a{i}.png", "path": f"a{i}.png", "sha256": "x",
                         "finding": finding, "model_finding": finding, "box_index": 0,
                         "box_x": 10.0, "box_y": 10.0, "box_w": 30.0, "box_h": 20.0,
                         "labels": "Mass|Effusion"})
    manifest = pd.DataFrame(rows)
    settings = _settings(methods=["gradcam", "integrated_gradients"], ig_steps=2)
    sample = [("a0.png", "Mass"), ("a2.png", "Effusion")]
    out = audit_batch(model, manifest, images, settings, [], tmp_path / "b", ig_pairs=sample)
    boxes = read_table(out, "boxes")
    ig = boxes[boxes["method"] == "integrated_gradients"]
    assert sorted(zip(ig["image_key"], ig["model_finding"], strict=True)) == sorted(sample)
    assert len(boxes[boxes["method"] == "gradcam"]) == 6
    full = audit_batch(model, manifest, images, settings, [], tmp_path / "c")
    full_boxes = read_table(full, "boxes")
    keys = ["image_key", "model_finding", "method", "box_index"]
    merged = boxes.merge(full_boxes, on=keys, suffixes=("", "_full"))
    assert len(merged) == len(boxes)
    np.testing.assert_allclose(merged["iou"], merged["iou_full"], rtol=1e-6, atol=1e-9)


def _three_pngs_and_a_missing_file(tmp_path) -> pd.DataFrame:
    from PIL import Image

    rng = np.random.default_rng(2)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50, 60), dtype=np.uint8)).save(
            tmp_path / f"p{i}.png")
        rows.append({"image_key": f"p{i}.png", "path": f"p{i}.png"})
    rows.append({"image_key": "gone.png", "path": "gone.png"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["processes", "threads", "serial"])
def test_prefetched_images_equal_the_images_decoded_here(tmp_path, kind):
    frame = _three_pngs_and_a_missing_file(tmp_path)
    here, rejects_here = load_batch_images(frame, tmp_path, SIZE)
    prefetcher = {"processes": lambda: ProcessPrefetcher(tmp_path, SIZE, workers=1),
                  "threads": lambda: ThreadPrefetcher(tmp_path, SIZE, threads=3),
                  "serial": lambda: ImagePrefetcher(tmp_path, SIZE)}[kind]()
    try:
        prefetcher.submit("b0", frame)
        there, rejects_there = prefetcher.take("b0", frame)
        inline, rejects_inline = prefetcher.take("never-submitted", frame)
    finally:
        prefetcher.close()
    assert rejects_there == rejects_here == rejects_inline and len(rejects_here) == 1
    assert [i.key for i in there] == [i.key for i in here] == [i.key for i in inline]
    for a, b, c in zip(there, here, inline, strict=True):
        assert isinstance(a.tensor, torch.Tensor) and torch.equal(a.tensor, b.tensor)
        assert torch.equal(c.tensor, b.tensor)
        assert a.thumb_png == b.thumb_png == c.thumb_png
        assert a.pre.original_size == b.pre.original_size


def test_decode_threads_leave_dicom_files_to_the_thread_that_takes_the_batch(tmp_path,
                                                                              monkeypatch):
    import threading

    import hostile

    import audit.run.images as images_module

    frame = _three_pngs_and_a_missing_file(tmp_path)
    hostile.dicom_cr(tmp_path / "d.dcm")
    frame = pd.concat([frame, pd.DataFrame([{"image_key": "d.dcm", "path": "d.dcm"}])])
    seen: dict[str, str] = {}
    real = images_module.decode_bytes

    def spy(data, *args, **kwargs):
        kind = "dicom" if data[128:132] == b"DICM" else "png"
        seen.setdefault(kind, threading.current_thread().name)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(images_module, "decode_bytes", spy)
    here, rejects_here = load_batch_images(frame, tmp_path, SIZE)
    seen.clear()
    loader = ThreadPrefetcher(tmp_path, SIZE, threads=2)
    try:
        loader.submit("b", frame)
        there, rejects_there = loader.take("b", frame)
    finally:
        loader.close()
    assert seen["png"].startswith("decode") and seen["dicom"] == threading.current_thread().name
    assert [i.key for i in there] == [i.key for i in here] == ["d.dcm", "p0.png", "p1.png",
                                                               "p2.png"]
    assert rejects_there == rejects_here
    for a, b in zip(there, here, strict=True):
        assert torch.equal(a.tensor, b.tensor) and a.thumb_png == b.thumb_png


def test_a_cpu_run_decodes_in_threads_once_the_model_is_done_and_a_gpu_run_beside_it(tmp_path):
    frame = _three_pngs_and_a_missing_file(tmp_path)
    assert auto_workers(None, "cpu", cores=64, n_batches=100) == 0
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = image_prefetcher(tmp_path, SIZE, workers=0)
    finally:
        torch.set_num_threads(1)
        one_thread = image_prefetcher(tmp_path, SIZE, workers=0)
        torch.set_num_threads(before)
    processes = image_prefetcher(tmp_path, SIZE, workers=1)
    try:
        assert type(one_thread) is ImagePrefetcher  # a single thread decodes when taken
        assert isinstance(processes, ProcessPrefetcher) and processes.beside_the_device
        assert submit_next(processes, "b1", frame) is None  # started at once
        assert "b1" in processes._pending
        assert isinstance(threads, ThreadPrefetcher) and not threads.beside_the_device
        start = submit_next(threads, "b1", frame)
        assert callable(start) and "b1" not in threads._pending
        start()  # what audit_batch calls once the model is done (device_done)
        assert "b1" in threads._pending
        assert [i.key for i in threads.take("b1", frame)[0]] == ["p0.png", "p1.png", "p2.png"]
    finally:
        threads.close()
        processes.close()


@pytest.mark.parametrize("with_costly", [False, True])
def test_audit_batch_says_once_when_it_no_longer_needs_the_model(model, tmp_path, monkeypatch,
                                                                 with_costly):
    import audit.run.batch as batch_module

    events: list[str] = []
    for name in ("_explain", "_add_costly"):
        real = getattr(batch_module, name)

        def spy(*args, real=real, name=name, **kwargs):
            events.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(batch_module, name, spy)
    frame = _three_pngs_and_a_missing_file(tmp_path)
    frame["box_x"], frame["box_y"], frame["box_w"], frame["box_h"] = 5.0, 5.0, 20.0, 20.0
    frame["model_finding"] = frame["finding"] = "Mass"
    frame["labels"] = "Mass"
    frame["sha256"], frame["box_index"] = "0" * 64, 0
    settings = _settings(metrics=["localization", "repeatability"])
    costly = [("p0.png", "Mass")] if with_costly else []
    audit_batch(model, frame, tmp_path, settings, costly, tmp_path / "out",
                device_done=lambda: events.append("done"))
    expected = ["_explain", "_add_costly", "done"] if with_costly else \
        ["_explain", "done", "_add_costly"]
    assert events == expected


def test_default_decode_workers_leave_two_cores_to_torch_but_one_worker_from_two_cores():
    gpu = [auto_workers(None, "cuda", cores) for cores in (1, 2, 3, 4, 8, 64)]
    assert gpu == [0, 1, 1, 2, 4, 4]
    assert auto_workers(3, "cuda", 2) == 3 and auto_workers(0, "cuda", 64) == 0
    # a short run starts no workers unless asked to
    assert auto_workers(None, "cuda", 8, n_batches=PREFETCH_MIN_BATCHES - 1) == 0
    assert auto_workers(None, "cuda", 8, n_batches=PREFETCH_MIN_BATCHES) == 4
    assert auto_workers(2, "cuda", 8, n_batches=1) == 2
    # on the CPU, threads of this process decode (workers only when asked for), at most 4
    assert auto_workers(None, "cpu", 64) == 0 and auto_workers(2, "cpu", 64) == 2
    before = torch.get_num_threads()
    try:
        counts = []
        for n in (1, 2, 8):
            torch.set_num_threads(n)
            counts.append(decode_threads())
    finally:
        torch.set_num_threads(before)
    assert counts == [1, 2, MAX_DECODE_THREADS] and MAX_DECODE_THREADS == 4


def test_thumbnail_is_the_min_max_scaled_image_at_256_px():
    from io import BytesIO

    from PIL import Image

    pixels = np.tile(np.linspace(10, 210, 512, dtype=np.float32), (300, 1))
    with Image.open(BytesIO(thumbnail_png(pixels))) as img:
        assert img.size == (256, 150) and img.mode == "L"
        arr = np.asarray(img)
    assert arr[:, 0].max() <= 1 and arr[:, -1].min() >= 254


def test_plan_counts_and_estimate_from_a_given_calibration():
    settings = _settings(methods=["gradcam", "gradcampp", "integrated_gradients"],
                         metrics=["localization", "fidelity"], ig_steps=10,
                         ig_method="riemann_trapezoid", fidelity_step=0.5, ig_per_pathology=1)
    manifest = _manifest()
    selection = plan.Selection(manifest=manifest, costly=[("k1", "Mass")],
                               ig=plan.ig_pairs(manifest, settings))
    counts = estimate.run_plan(selection, settings)
    # 7 images; 9 boxed pairs + 2 label targets of k9; IG: one pair per finding
    assert (counts.images, counts.boxes, counts.targets) == (7, 9, 11)
    assert (counts.ig_pairs, counts.costly_pairs, counts.ig_points) == (2, 1, 10)
    cal = estimate.Calibration(forward=0.1, forward_backward=0.3, load=0.05)
    parts = counts.seconds(cal, settings)
    assert parts["load"] == pytest.approx(7 * 0.05)
    assert parts["explain"] == pytest.approx(7 * 0.1 + 2 * 10 * 0.3)
    # fidelity: 3 methods x 2 orders x 2 x (2 steps + 1) forwards
    assert parts["costly"] == pytest.approx(3 * 2 * 6 * 0.1)
    text = estimate.describe(counts, cal, settings, "cpu")
    assert "7 images, 9 boxes, 11 (image, finding) targets" in text
    assert "IG 10 steps on 2 pairs" in text and "1 costly pairs" in text
    assert "estimate: about 11 s" in text  # 0.35 + 6.7 + 3.6 = 10.65 s


def test_the_load_calibration_leaves_out_the_first_decode_of_the_process(monkeypatch):
    calls: list[int] = []

    def fake_load(rows, images_root, size):  # one-time set-up on the first call only
        calls.append(len(rows))
        time.sleep(0.5 if len(calls) == 1 else 0.02)
        return [], []

    monkeypatch.setattr(estimate, "load_batch_images", fake_load)
    manifest = pd.DataFrame({"image_key": ["a", "b", "c"], "path": ["a", "b", "c"]})
    seconds = estimate._load_seconds(manifest[manifest["image_key"].isin(["a", "b"])], "/", 64)
    assert len(calls) == 1 + estimate.TIMED_PASSES
    assert 0.01 - 1e-3 <= seconds < 0.1  # 0.02 s per pass of 2 images; the 0.5 s left out


def test_gauss_legendre_counts_its_two_end_forwards():
    settings = _settings(methods=["integrated_gradients"], ig_steps=5)
    selection = plan.Selection(manifest=_manifest())
    assert estimate.run_plan(selection, settings).ig_points == 7


def test_image_rows_read_boxes_labels_and_targets_of_each_image_once(model):
    from audit.run.batch import image_rows, image_targets, prediction_rows

    nan = np.nan
    rows = pd.DataFrame([  # manifest rows: one per box, one per image without boxes
        {"image_key": "a", "path": "a.png", "labels": "Mass|Nodule", "model_finding": "Mass",
         "box_x": 1.0, "box_index": 0},
        {"image_key": "a", "path": "a.png", "labels": "Mass|Nodule", "model_finding": "Nodule",
         "box_x": 2.0, "box_index": 1},
        {"image_key": "a", "path": "a.png", "labels": "Mass|Nodule", "model_finding": "Mass",
         "box_x": 3.0, "box_index": 2},
        {"image_key": "b", "path": "sub/b.png", "labels": "Infiltrate|No Finding",
         "model_finding": nan, "box_x": nan, "box_index": nan},
        {"image_key": "c", "path": "c.png", "labels": nan, "model_finding": nan, "box_x": nan,
         "box_index": nan},
        {"image_key": "d", "path": "d.png", "labels": "Unicorn", "model_finding": nan,
         "box_x": nan, "box_index": nan},
        {"image_key": "e", "path": "e.png", "labels": nan, "model_finding": nan,
         "box_x": 4.0, "box_index": 0},  # a box whose finding is unknown (edited manifest)
    ])
    images = image_rows(rows)
    a, b, c = images["a"], images["b"], images["c"]
    assert sorted(a.boxes) == ["Mass", "Nodule"]
    assert a.boxes["Mass"]["box_index"].tolist() == [0, 2]  # manifest order
    assert a.label_findings == ["Mass", "Nodule"] and a.has_labels
    assert b.boxes == {} and b.label_findings == ["Infiltration"] and b.path == "sub/b.png"
    assert not c.has_labels and c.label_findings == [] and c.named_findings == set()
    rejects: list[dict[str, str]] = []
    item = {k: LoadedImage(key=k, pre=None, thumb_png=b"") for k in "abcde"}
    assert image_targets(model, a, item["a"], rejects) == ["Mass", "Nodule"]
    assert image_targets(model, b, item["b"], rejects) == ["Infiltration"]  # from its labels
    assert image_targets(model, c, item["c"], rejects) == []
    assert image_targets(model, images["d"], item["d"], rejects) == []
    assert image_targets(model, images["e"], item["e"], rejects) == []
    assert [(r["image_key"], r["finding"]) for r in rejects] == [("d", "Unicorn"), ("e", "")]
    n = len(model.pathologies)
    zeros = np.zeros(n)
    labels_b = {r["finding"]: r["label"] for r in prediction_rows(model, b, item["b"], zeros,
                                                                    zeros)}
    assert labels_b["Infiltration"] == 1.0 and labels_b["Mass"] == 0.0
    labels_c = [r["label"] for r in prediction_rows(model, c, item["c"], zeros, zeros)]
    assert len(labels_c) == len([p for p in model.pathologies if p])
    assert all(np.isnan(v) for v in labels_c)  # no labels: unknown, not negative
