"""A plain-torch stand-in for the parts of Transformer Engine that bmc_fast.model.te_layers uses, for CPU tests.

It implements TE's *documented* semantics and parameter names (v2.18): nn.Linear-layout weights,
``layer_norm_weight``/``layer_norm_bias``, ``fc1_*``/``fc2_*``, tanh-approximated ``gelu``, quick-GELU
``qgelu``, gated activations that activate the first half of fc1's output. It checks the TE model's
wiring and weight mapping; it says nothing about TE's kernels, which only a GPU run can verify.
"""
import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from bmc_fast.model.te_layers import TELayers

_ACT = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "qgelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}
_GATED = {"geglu": "gelu", "qgeglu": "qgelu", "reglu": "relu", "swiglu": "silu"}


def _init(weight, init_method):
    """TE's rule: ``init_method(weight)``, or normal(0, 0.023) when None."""
    with torch.no_grad():
        (init_method or (lambda w: nn.init.normal_(w, mean=0.0, std=0.023)))(weight)
    return weight


class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device="cuda", init_method=None,
                 **unused):
        super().__init__()
        self.weight = nn.Parameter(_init(torch.empty(out_features, in_features, dtype=params_dtype, device=device),
                                         init_method))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device=device)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, eps=1e-5, bias=True, normalization="LayerNorm", params_dtype=None,
                 device="cuda", init_method=None, **unused):
        super().__init__(in_features, out_features, bias, params_dtype, device, init_method)
        assert normalization == "LayerNorm"
        self.eps = eps
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features, dtype=params_dtype, device=device))
        self.layer_norm_bias = nn.Parameter(torch.zeros(in_features, dtype=params_dtype, device=device))

    def forward(self, x):
        x = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return super().forward(x)


class LayerNormMLP(nn.Module):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, bias=True, normalization="LayerNorm",
                 activation="gelu", params_dtype=None, device="cuda", init_method=None, output_layer_init_method=None,
                 **unused):
        super().__init__()
        self.eps, self.activation = eps, activation
        fc1_out = 2 * ffn_hidden_size if activation in _GATED else ffn_hidden_size
        new = dict(dtype=params_dtype, device=device)
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden_size, **new))
        self.layer_norm_bias = nn.Parameter(torch.zeros(hidden_size, **new))
        self.fc1_weight = nn.Parameter(_init(torch.empty(fc1_out, hidden_size, **new), init_method))
        self.fc2_weight = nn.Parameter(_init(torch.empty(hidden_size, ffn_hidden_size, **new),
                                             output_layer_init_method))
        if bias:
            self.fc1_bias = nn.Parameter(torch.zeros(fc1_out, **new))
            self.fc2_bias = nn.Parameter(torch.zeros(hidden_size, **new))
        else:
            self.fc1_bias = self.fc2_bias = None

    def forward(self, x):
        x = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        h = F.linear(x, self.fc1_weight, self.fc1_bias)
        if self.activation in _GATED:
            first, second = h.chunk(2, dim=-1)
            h = _ACT[_GATED[self.activation]](first) * second
        else:
            h = _ACT[self.activation](h)
        return F.linear(h, self.fc2_weight, self.fc2_bias)


autocast_calls = []


def autocast(enabled=True, recipe=None, **unused):
    autocast_calls.append(recipe)
    return contextlib.nullcontext()


def is_mxfp8_available():
    return False


te = types.SimpleNamespace(Linear=Linear, LayerNormLinear=LayerNormLinear, LayerNormMLP=LayerNormMLP,
                           autocast=autocast, is_mxfp8_available=is_mxfp8_available)


class Format:
    HYBRID = "HYBRID"
    E4M3 = "E4M3"


class DelayedScaling(types.SimpleNamespace):
    pass


class MXFP8BlockScaling(types.SimpleNamespace):
    pass


recipe = types.SimpleNamespace(Format=Format, DelayedScaling=DelayedScaling, MXFP8BlockScaling=MXFP8BlockScaling)

# What BMCLongCLIP(cfg, te_layers=...) builds with: these stand-ins, fp32 on the CPU.
layers = TELayers(te, recipe, "cpu", torch.float32)
