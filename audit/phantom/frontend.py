"""The reference models' fixed front end and the live-channel head forward used to train them.

On a shared 2-core CPU, end-to-end training of DenseNet-121 at 224 costs ~5 s (idle) to ~35 s
(loaded) per step of 16 images: too slow to reach the targets within the time box. The shipped
models therefore use a *hand-constructed front end* and a *trained head*, both inside the
unchanged torchxrayvision DenseNet-121:

- conv0/norm0 compute FRONTEND_CHANNELS fixed feature maps of the input (intensity ramps
  relu((mean3x3(x) - T) / D) at many levels T, dark ramps, centre-surround texture and edge
  responses, a constant channel), relu0 + pool0 as usual;
- every dense layer of blocks 1-3 adds zeros (conv weights 0) and each transition passes
  channels 0..63 through unchanged (BN identity, 1x1 conv = identity on them, 2x2 average
  pool), so the input of denseblock4 is exactly avg_pool_8(pool0 output) on channels 0..63;
- the first ``live_layers`` dense layers of denseblock4, norm5 and the classifier are trained
  (seeded init as in xrv); the other block-4 layers are silenced (:func:`silence_block4_after`).

The CAM is computed by the usual graph (features.norm5); the front end only determines which
local intensity statistics reach the 7x7 grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FRONTEND_CHANNELS = 64
_U = 2048.0 / 255.0  # one 8-bit grey level in xrv units
RAMP_STEP = 10.0 * _U
UP_LEVELS = [10.0 * i for i in range(1, 25)]  # 8-bit grey levels 10..240
DOWN_LEVELS = [20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]


def _frontend_filters() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv0 weight [64,1,7,7], norm0 weight (gamma) [64], norm0 bias (beta) [64])."""
    w = torch.zeros(FRONTEND_CHANNELS, 1, 7, 7, dtype=torch.float64)
    g = torch.zeros(FRONTEND_CHANNELS, dtype=torch.float64)
    b = torch.zeros(FRONTEND_CHANNELS, dtype=torch.float64)
    m3 = torch.zeros(7, 7, dtype=torch.float64)
    m3[2:5, 2:5] = 1.0 / 9.0
    m7 = torch.full((7, 7), 1.0 / 49.0, dtype=torch.float64)
    m1 = torch.zeros(7, 7, dtype=torch.float64)
    m1[3, 3] = 1.0
    gx = torch.zeros(7, 7, dtype=torch.float64)
    gx[:, 4:] = 1.0 / 21.0
    gx[:, :3] = -1.0 / 21.0
    c = 0
    for t in UP_LEVELS:  # relu((m3 - T) / D)
        w[c, 0], g[c], b[c] = m3, 1.0 / RAMP_STEP, -(t * _U - 1024.0) / RAMP_STEP
        c += 1
    for t in DOWN_LEVELS:  # relu((T - m3) / D)
        w[c, 0], g[c], b[c] = -m3, 1.0 / RAMP_STEP, (t * _U - 1024.0) / RAMP_STEP
        c += 1
    tex = 3.0 * _U
    for k in (m3 - m7, m7 - m3, m1 - m3, m3 - m1, gx, -gx, gx.T, -gx.T):
        w[c, 0], g[c], b[c] = k, 1.0 / tex, 0.0
        c += 1
    g[c], b[c] = 1.0, 1.0  # constant 1 (conv weight 0)
    return w.float(), g.float(), b.float()


def _set_bn_identity(bn: torch.nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def build_frontend(net: torch.nn.Module) -> torch.nn.Module:
    """Set conv0 ... transition3 of ``net`` to the fixed front end (in place); returns ``net``."""
    f = net.features
    w, g, b = _frontend_filters()
    with torch.no_grad():
        f.conv0.weight.copy_(w)
        f.norm0.running_mean.zero_()
        f.norm0.running_var.fill_(1.0 - f.norm0.eps)
        f.norm0.weight.copy_(g)
        f.norm0.bias.copy_(b)
        for name in ("denseblock1", "denseblock2", "denseblock3"):
            for layer in getattr(f, name).children():
                _set_bn_identity(layer.norm1)
                _set_bn_identity(layer.norm2)
                layer.conv1.weight.zero_()
                layer.conv2.weight.zero_()
        for name in ("transition1", "transition2", "transition3"):
            t = getattr(f, name)
            _set_bn_identity(t.norm)
            t.conv.weight.zero_()
            for k in range(FRONTEND_CHANNELS):
                t.conv.weight[k, k, 0, 0] = 1.0
    return net


def frontend_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input of denseblock4 ``[B, 512, 7, 7]`` by the short path (equal to the full graph for a
    net built by :func:`build_frontend`; verified in tests)."""
    f = net.features
    h = f.pool0(F.relu(f.norm0(f.conv0(x))))
    h = F.avg_pool2d(h[:, :FRONTEND_CHANNELS], 8)
    return F.pad(h, (0, 0, 0, 0, 0, f.transition3.conv.out_channels - FRONTEND_CHANNELS))


def full_block4_input(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input of denseblock4 through the whole graph (conv0 ... transition3)."""
    f = net.features
    h = x
    for name, mod in f.named_children():
        if name == "denseblock4":
            return h
        h = mod(h)
    raise RuntimeError("no denseblock4")


def _bn_live(bn: torch.nn.BatchNorm2d, h: torch.Tensor, live: torch.Tensor, training: bool):
    """BatchNorm over the live channels only (running statistics written back in place)."""
    rm, rv = bn.running_mean[live].clone(), bn.running_var[live].clone()
    out = F.batch_norm(h, rm, rv, bn.weight[live], bn.bias[live], training, bn.momentum, bn.eps)
    if training:
        with torch.no_grad():
            bn.running_mean[live] = rm
            bn.running_var[live] = rv
    return out


def silence_block4_after(net: torch.nn.Module, live_layers: int) -> torch.nn.Module:
    """Zero the convolutions of denseblock4 layers ``live_layers..15`` (they then add zeros)."""
    with torch.no_grad():
        for k, layer in enumerate(net.features.denseblock4.children()):
            if k >= live_layers:
                layer.conv1.weight.zero_()
                layer.conv2.weight.zero_()
    return net


def head_live(net, z64: torch.Tensor, idx: list[int], live_layers: int, training: bool):
    """(logits [B, 18], CAM [B, K, 7, 7]) computed on the live channels only, differentiably.

    ``CAM_c = sum_k W[c, k] ReLU(norm5)_k``, signed and unscaled: the map the training losses act
    on (``relu(cam)`` outside the box, ``softmax(cam)`` on the box). ``ReLU(CAM_c) / 49`` is the
    audit's default Grad-CAM (the rectified norm5 map, closed form in ``audit.saliency._cam``),
    but that one runs under ``inference_mode`` on the full graph and is rectified, so training
    cannot use it.

    For a net built by :func:`build_frontend` and :func:`silence_block4_after` this equals the
    logits and CAM of the full graph (``audit.phantom.evaluation.all_cams``) on the zero-padded
    input (dead channels are exactly zero before every BN and their BN parameters are untouched:
    rm 0, beta 0), at a fraction of the cost."""
    b4 = list(net.features.denseblock4.children())
    c_in = net.features.transition3.conv.out_channels
    live = list(range(FRONTEND_CHANNELS))
    feats = [z64]
    for k in range(live_layers):
        layer = b4[k]
        h = torch.cat(feats, 1)
        li = torch.tensor(live)
        h = F.relu(_bn_live(layer.norm1, h, li, training))
        h = F.conv2d(h, layer.conv1.weight[:, li])
        h = layer.conv2(F.relu(layer.norm2(h)))
        feats.append(h)
        live += list(range(c_in + 32 * k, c_in + 32 * (k + 1)))
    li = torch.tensor(live)
    a = F.relu(_bn_live(net.features.norm5, torch.cat(feats, 1), li, training))
    w = net.classifier.weight[:, li]
    logits = a.mean(dim=(2, 3)) @ w.T + net.classifier.bias
    cam = torch.einsum("ck,bkhw->bchw", w[idx], a)
    return logits, cam
