"""Contrastive representation distillation (Tian et al., "Contrastive Representation
Distillation", ICLR 2020), with the NCE memory banks of its reference code.

Trainable linear embeddings g_s, g_t map the penultimate features to unit vectors of size
``feat_dim`` (v_s = g_s(f_s) / ||.||, v_t likewise; the teacher's features are detached, g_t
trains). Two memory banks of N = LossSetup.num_samples rows hold a running embedding of every
training sample (M_s for the student, M_t for the teacher). For sample i, its positive is its
own row (``batch.index``) and K = ``nce_k`` negatives are drawn from the N rows:

    h(v, m) = exp(<v, m> / T) / Z                         (Z fixed at the first step: mean * N)
    P_pos = h(v, m_i),  P_neg = h(v, m_k),  c = K / N     (noise-contrastive estimation)
    nce(v, M) = -(1/B) sum_b [log(P_pos / (P_pos + c)) + sum_k log(c / (P_neg,k + c))]
    loss = ce_weight * CE(z_s, y) + weight * (nce(v_s, M_t) + nce(v_t, M_s))

After each training step the banks move towards the batch: m_i <- normalize(momentum * m_i +
(1 - momentum) * v_i). Defaults: K = 16384, T = 0.07, momentum 0.5, feat_dim 128, weight 0.8,
CE weight 1 (the paper's CIFAR-100 setting and RepDistiller's ``crd`` defaults: -b 0.8).

Negatives: ``exact`` (default, the reference's default mode) draws them from samples of other
classes. The loss learns each sample's class from the batches it sees (``index``, ``y``), so in
the first epoch a not-yet-seen sample counts as another class; a same-class draw is redrawn up to
``REDRAWS`` times (with C classes about C^-5 of the draws stay same-class). ``uniform``: from all
N samples (the reference's own sampler when given no indices). Draws come from a generator
seeded by ``seed`` and the step count, so a resumed run draws the same negatives. Banks, labels
and Z are buffers: they checkpoint and resume with the loss (2 x N x feat_dim float32: 51 MB at
N = 50000).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptd.config import ConfigError
from ptd.distill._common import check, cross_entropy, float32, OneLayerLoss
from ptd.distill.base import PENULTIMATE, DistillBatch, LossSetup, register_loss
from ptd.machine import gib, memory_bytes
from ptd.seeding import MAX_SEED

EPS = 1e-7  # added to the NCE denominators, as the reference code does
REDRAWS = 4  # rounds of redrawing same-class negatives ("exact" mode); fixed, so no host sync
NEGATIVES = ("exact", "uniform")


def nce(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """p: [B, 1 + K] normalized scores, positive first."""
    c = (p.shape[1] - 1) / n_data
    log_pos = torch.log(p[:, 0] / (p[:, 0] + c + EPS))
    log_neg = torch.log(c / (p[:, 1:] + c + EPS))
    return -(log_pos.sum() + log_neg.sum()) / p.shape[0]


# Bytes a step holds per (sample, negative) pair: the int64 draws and redraws with their
# same-class mask, the gathered scores of both directions and their gradients (float32).
STEP_BYTES_PER_PAIR = 8 * (2 + REDRAWS) + 4 * 4


def check_memory(options: "CRDLoss.Options", setup: LossSetup, feature_sizes: int) -> None:
    """Refuse, before any training, a loss that cannot fit in this machine's memory: its two
    embeddings (``feature_sizes`` x feat_dim weights, with gradients and momentum), its banks
    (2 x N x feat_dim floats) and a step's B x nce_k pairs. Without it an oversized nce_k or
    feat_dim ends the run at the first distillation step, after the teachers trained."""
    have = memory_bytes()
    if not have:
        return
    embed = 3 * feature_sizes * options.feat_dim * 4
    bank = 2 * setup.num_samples * options.feat_dim * 4
    step = (setup.batch_size or 1) * (options.nce_k + 1) * STEP_BYTES_PER_PAIR
    if embed + bank + step > have:
        raise ConfigError(f"distill.options.crd: embeddings to {options.feat_dim:,} dimensions, memory banks of "
                          f"{setup.num_samples:,} samples and steps of {setup.batch_size or 1} x {options.nce_k:,} negatives "
                          f"need {gib(embed + bank + step)} against this machine's {gib(have)}; lower nce_k or feat_dim")


class Embed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: exp(<v, m> / 0.07) turns bf16's 0.4% rounding into ~6% errors
        with float32(x.device):
            return F.normalize(self.linear(x.flatten(1).float()), dim=1)


@register_loss("crd")
class CRDLoss(OneLayerLoss):
    single_process_only = ("its memory banks keep one row per training sample; under DDP each rank would update only "
                           "its own samples' rows and rank 0's buffers overwrite the others' at every step "
                           "(measured: 192 of 384 rows learned per epoch on 2 ranks)")
    @dataclass(frozen=True)
    class Options:
        ce_weight: float = 1.0
        weight: float = 0.8
        feat_dim: int = 128
        nce_k: int = 16384  # negatives per sample
        temperature: float = 0.07
        momentum: float = 0.5  # memory-bank update
        negatives: str = "exact"  # exact: other classes only; uniform: any sample
        seed: int = 0  # negative sampling and bank initialization
        teacher_layer: str = PENULTIMATE
        student_layer: str = ""  # empty: the same name as teacher_layer

        def __post_init__(self) -> None:
            check(self.ce_weight >= 0, "crd", "ce_weight", self.ce_weight, "must be >= 0")
            check(self.weight >= 0, "crd", "weight", self.weight, "must be >= 0")
            check(self.feat_dim >= 1, "crd", "feat_dim", self.feat_dim, "must be >= 1")
            check(self.nce_k >= 1, "crd", "nce_k", self.nce_k, "must be >= 1")
            check(self.temperature > 0, "crd", "temperature", self.temperature, "must be > 0")
            check(0 <= self.momentum < 1, "crd", "momentum", self.momentum, "must be in [0, 1)")
            check(self.negatives in NEGATIVES, "crd", "negatives", self.negatives, f"must be one of {', '.join(NEGATIVES)}")
            # negatives() seeds with seed * 1_000_003 + step, which torch's manual_seed takes up to 2**64 - 1
            check(0 <= self.seed <= MAX_SEED, "crd", "seed", self.seed, f"must be in 0..{MAX_SEED} (2**32 - 1, the largest seed "
                  f"every consumer in ptd takes)")

    def __init__(self, options: Options, setup: LossSetup):
        super().__init__(options, setup)
        t, s = self.t_shape, self.s_shape
        if setup.num_samples < 2:
            raise ValueError(f"crd: LossSetup.num_samples = {setup.num_samples}; the memory bank needs the training-set size (>= 2)")
        check_memory(options, setup, math.prod(s) + math.prod(t))
        self.embed_s = Embed(math.prod(s), options.feat_dim)
        self.embed_t = Embed(math.prod(t), options.feat_dim)
        n, d = setup.num_samples, options.feat_dim
        g = torch.Generator().manual_seed(options.seed)
        stdv = 1.0 / math.sqrt(d / 3)  # reference init: uniform(-stdv, stdv), rows of about unit norm
        self.register_buffer("memory_s", torch.rand(n, d, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, d, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # normalizers for (student, teacher) scores; -1: unset
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("labels", torch.full((n,), -1, dtype=torch.int64))  # -1: not seen yet
        if setup.labels is not None:  # known up front: no first epoch of unfiltered negatives
            self.labels.copy_(torch.as_tensor(setup.labels, dtype=torch.int64).reshape(n))

    def negatives(self, index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, 1 + K] bank rows: the sample itself, then K negatives."""
        g = torch.Generator(device=index.device)
        g.manual_seed(self.options.seed * 1_000_003 + int(self.steps))
        n, shape = self.setup.num_samples, (len(index), self.options.nce_k)
        neg = torch.randint(0, n, shape, generator=g, device=index.device)
        if self.options.negatives == "exact":
            for _ in range(REDRAWS):
                same = self.labels[neg] == y[:, None]
                neg = torch.where(same, torch.randint(0, n, shape, generator=g, device=index.device), neg)
        return torch.cat([index[:, None], neg], 1)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        o = self.options
        vs = self.embed_s(batch.s_feats[self.s_name])
        vt = self.embed_t(batch.t_feats[self.t_name].detach())
        n = self.setup.num_samples
        with float32(vs.device):
            vs, vt = vs.float(), vt.float()
            idx = self.negatives(batch.index, batch.y)
            # Scores against every bank row, then the sampled ones: [N, B] is 64x smaller than the
            # reference's gathered [B, 1 + K, D] rows (537 MB at B = 64, K = 16384, D = 128).
            # The banks are cloned (25.6 MB each at N = 50000): backward needs them as they were
            # before this step's in-place update below.
            mem_s, mem_t = self.memory_s.clone(), self.memory_t.clone()
            e_s = torch.exp((mem_t @ vs.t()).t().gather(1, idx) / o.temperature)  # student vs teacher bank
            e_t = torch.exp((mem_s @ vt.t()).t().gather(1, idx) / o.temperature)
            if self.z[0] < 0:  # reference: Z set once, from the first batch, then kept
                self.z.copy_(torch.stack([e_s.detach().mean() * n, e_t.detach().mean() * n]))
            loss = nce(e_s / self.z[0], n) + nce(e_t / self.z[1], n)
            if self.training:
                with torch.no_grad():
                    i = batch.index
                    self.memory_s.index_copy_(0, i, F.normalize(self.memory_s[i] * o.momentum + vs.detach() * (1 - o.momentum), dim=1))
                    self.memory_t.index_copy_(0, i, F.normalize(self.memory_t[i] * o.momentum + vt.detach() * (1 - o.momentum), dim=1))
                    self.labels.index_copy_(0, i, batch.y)
                    self.steps += 1
            return {"ce": cross_entropy(batch.s_logits, batch.y, o.ce_weight), "crd": o.weight * loss}
