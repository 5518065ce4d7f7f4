"""audit.model: loading, hook-safe forward, logits/probabilities, fingerprint, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from audit.model import (
    KNOWN_WEIGHTS,
    AuditModel,
    UnknownFinding,
    WeightsUnavailable,
    load_model,
    memory_format_for,
    state_dict_fingerprint,
    weights_cache_path,
)

xrv = pytest.importorskip("torchxrayvision")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two OpenMP threads run 5-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def model() -> AuditModel:
    return load_model(random_init=True, seed=0, device="cpu")


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.rand((2, 1, 64, 64), generator=g) * 2048 - 1024


def _stock(seed: int = 0):
    torch.manual_seed(seed)
    return xrv.models.DenseNet(weights=None).eval()


def _in_layout_of(net: torch.nn.Module, model: AuditModel) -> torch.nn.Module:
    """``net`` in the memory format of ``model`` on its device: the same ops in the same order,
    so outputs can be compared bit for bit."""
    return net.to(memory_format=memory_format_for(model.device))


def test_hook_safe_forward_gives_identical_logits_to_stock_xrv_forward(model, x):
    stock = _in_layout_of(_stock(0), model)
    with torch.no_grad():
        expected = stock(x)
        assert torch.equal(model.logits(x), expected)
        assert torch.equal(model.net(x), expected)
        assert torch.equal(stock.features2(x), model.net.features2(x))


def test_a_cpu_model_runs_channels_last_and_only_rounding_separates_it_from_the_stock_layout(
        model, x):
    assert memory_format_for(torch.device("cpu")) == torch.channels_last
    conv = model.net.features.denseblock1.denselayer1.conv2.weight  # 3x3 over 128 channels
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.provenance["memory_format"] == "channels_last"
    stock = _stock(0)  # contiguous, as torchxrayvision builds it
    # the fingerprint hashes values, not strides: the same weights in either layout
    assert model.fingerprint == state_dict_fingerprint(stock.state_dict())
    with torch.no_grad():
        ours, theirs = model.logits(x), stock(x)
        acts, stock_acts = model.features(x), torch.relu(stock.features(x))
    # another summation order of float32 sums over up to 1024 channels: within 1e-5 of the
    # largest value (observed ~1e-6 on this build; equal where oneDNN sums in the same order)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert (acts - stock_acts).abs().max() <= 1e-5 * stock_acts.abs().max()


def test_moving_a_model_gives_it_the_memory_format_of_its_new_device(model):
    moved = model.copy()
    moved.net.to(memory_format=torch.contiguous_format)
    moved.to("cpu")
    conv = moved.net.features.denseblock1.denselayer1.conv2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert moved.provenance["memory_format"] == "channels_last"


def test_hook_safe_forward_does_not_modify_the_norm5_output(model, x):
    seen = {}
    h = model.net.features.norm5.register_forward_hook(
        lambda m, i, o: seen.update(out=o, copy=o.detach().clone()))
    try:
        with torch.no_grad():
            model.logits(x)
    finally:
        h.remove()
    assert torch.equal(seen["out"], seen["copy"])  # no in-place ReLU after the hook ran
    assert (seen["copy"] < 0).any()


def test_features_are_the_rectified_norm5_map_that_is_pooled(model):
    x224 = torch.zeros((1, 1, 224, 224))
    with torch.no_grad():
        a = model.features(x224)
        pre = model.net.features(x224)
    assert a.shape == (1, 1024, 7, 7)
    assert torch.equal(a, torch.relu(pre))
    w, b = model.net.classifier.weight, model.net.classifier.bias
    with torch.no_grad():
        assert torch.allclose(a.mean(dim=(2, 3)) @ w.t() + b, model.logits(x224), rtol=1e-5,
                              atol=1e-4)


def test_random_init_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_model(random_init=True, seed=3, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_model(random_init=True, seed=3, device="cpu")
    c = load_model(random_init=True, seed=4, device="cpu")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.name == "random-init(seed=3)"
    assert not a.net.training


def test_fingerprint_is_stable_and_changes_when_one_weight_changes(model):
    fp = model.fingerprint
    assert len(fp) == 64 and fp == model.fingerprint
    other = model.copy()
    assert other.fingerprint == fp
    with torch.no_grad():
        other.net.features.denseblock2.denselayer3.conv1.weight[0, 0, 0, 0] += 1e-3
    assert other.fingerprint != fp
    assert model.fingerprint == fp  # the copy owns its parameters


def test_unknown_finding_error_lists_the_known_names(model):
    with pytest.raises(UnknownFinding) as err:
        model.finding_index("Broken Heart")
    text = str(err.value)
    assert "Broken Heart" in text and "Effusion" in text and "Cardiomegaly" in text
    assert "Effusion" in err.value.known
    assert model.finding_index("Effusion") == model.pathologies.index("Effusion")
    assert model.finding_index("Infiltrate") == model.pathologies.index("Infiltration")


def test_weights_unavailable_names_the_cache_path_and_the_checkpoint_option(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):  # a download attempt would be a bug
        raise AssertionError("download attempted")

    monkeypatch.setattr(xrv.utils, "download", no_download)
    with pytest.raises(WeightsUnavailable) as err:
        load_model(weights="densenet121-res224-nih", cache_dir=tmp_path, device="cpu")
    expected = weights_cache_path("densenet121-res224-nih", tmp_path)
    assert expected.parent == tmp_path
    assert expected.name == "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    assert str(expected) in str(err.value)
    assert "--checkpoint" in str(err.value)
    assert "densenet121-res224-nih" in KNOWN_WEIGHTS


def test_weights_unavailable_when_the_download_fails(tmp_path, monkeypatch):
    def failing_download(url, filename):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(xrv.utils, "download", failing_download)
    with pytest.raises(WeightsUnavailable, match="no route to host"):
        load_model(weights="densenet121-res224-chex", cache_dir=tmp_path, allow_download=True,
                   device="cpu")


def test_named_weights_load_from_the_cache_with_their_labels_and_op_threshs(model, tmp_path, x):
    # A cache file in torchxrayvision's format (a pickled model) -> loads offline by name.
    stock = _stock(0)
    path = weights_cache_path("densenet121-res224-nih", tmp_path)
    torch.save(stock, path)
    m = load_model(weights="densenet121-res224-nih", cache_dir=tmp_path, device="cpu")
    assert m.pathologies == list(xrv.models.model_urls["nih"]["labels"])
    assert m.op_threshs is not None and torch.isnan(m.op_threshs[-1])
    ref = _in_layout_of(
        xrv.models.DenseNet(weights="densenet121-res224-nih", cache_dir=str(tmp_path)), m)
    x224 = torch.nn.functional.interpolate(x[:1], size=224, mode="bilinear")
    with torch.no_grad():
        expected = ref(x224)  # op-normed outputs, as xrv reports them
        assert torch.equal(m.net(x224), expected)
        assert torch.equal(m.probabilities(x224), expected)
        logits = model.logits(x224)
        assert torch.equal(m.logits(x224), logits)
        assert torch.equal(m.probabilities(x224, op_norm=False), torch.sigmoid(logits))


def test_probabilities_apply_op_norm_exactly_like_xrv(model, x):
    op = torch.tensor(xrv.models.model_urls["nih"]["op_threshs"], dtype=torch.float32)
    stock = _in_layout_of(_stock(0), model)
    stock.op_threshs = op
    m = model.copy()
    m.net.op_threshs = op.clone()
    with torch.no_grad():
        assert torch.equal(m.probabilities(x), stock(x))
        assert torch.equal(m.net(x), stock(x))
        stock.op_threshs = None  # xrv's plain forward: the logits
        assert torch.equal(m.probabilities(x, op_norm=False), torch.sigmoid(stock(x)))


def test_checkpoint_state_dict_fp16_and_pickled_model_load(model, tmp_path, x):
    sd = model.net.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    m1 = load_model(checkpoint=tmp_path / "plain.pt", device="cpu")
    assert m1.fingerprint == model.fingerprint
    assert m1.provenance["file_sha256"] and m1.name == "checkpoint:plain.pt"

    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()},
                "pathologies": model.pathologies}, tmp_path / "wrapped.pt")
    assert load_model(checkpoint=tmp_path / "wrapped.pt", device="cpu").fingerprint \
        == model.fingerprint

    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save(half, tmp_path / "half.pt")
    m2 = load_model(checkpoint=tmp_path / "half.pt", device="cpu")
    assert all(p.dtype == torch.float32 for p in m2.net.parameters())
    assert torch.equal(m2.net.classifier.weight, sd["classifier.weight"].half().float())

    torch.save(_stock(0), tmp_path / "pickled.pt")
    m3 = load_model(checkpoint=tmp_path / "pickled.pt", device="cpu")
    with torch.no_grad():
        assert torch.equal(m3.logits(x), model.logits(x))


def test_checkpoint_with_other_outputs_needs_pathology_names(model, tmp_path):
    net = xrv.models.DenseNet(weights=None, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "three.pt")
    with pytest.raises(ValueError, match="pathologies"):
        load_model(checkpoint=tmp_path / "three.pt", device="cpu")
    torch.save({"state_dict": net.state_dict(), "pathologies": ["Effusion", "Mass", ""],
                "op_threshs": [0.1, 0.2, float("nan")]}, tmp_path / "three_named.pt")
    m = load_model(checkpoint=tmp_path / "three_named.pt", device="cpu")
    assert m.pathologies == ["Effusion", "Mass", ""]
    assert m.finding_index("Mass") == 1
    assert m.op_threshs.shape == (3,)


def test_load_model_needs_exactly_one_source():
    with pytest.raises(ValueError):
        load_model(device="cpu")
    with pytest.raises(ValueError):
        load_model(weights="densenet121-res224-nih", random_init=True, device="cpu")
    with pytest.raises(ValueError, match="unknown weights"):
        load_model(weights="resnet50-res512-all", device="cpu")


def test_copy_and_with_net_keep_hook_safety(model):
    twin = model.copy()
    assert twin.net is not model.net and isinstance(twin.net, type(model.net))
    other = model.with_net(copy.deepcopy(_stock(1)))  # a stock xrv network is made hook-safe
    assert hasattr(other.net, "relu5") and not other.net.training
    assert other.name == model.name
