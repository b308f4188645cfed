"""Which layers' widths are coupled, read off the model by Torch-Pruning's DependencyGraph.

Every Conv/Linear layer *produces* the channels of exactly one coupled group: the set of
layers whose output channels must stay equal in number (and index by index) because a residual
add joins them, a depthwise conv filters them one by one, an elementwise product gates them
(squeeze-excite), and so on. A layer *consumes* the channels of the groups feeding its input --
of several where a concatenation feeds it. Torch-Pruning traces the model once and hands back,
for channel 0 of a layer's output, every dependent operation (``get_pruning_group``); the
producers and consumers in that answer are the group.

This module only reads the model; :mod:`ptd.students.surgery` changes it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from ptd.pruning.masks import Masks
from ptd.errors import PtdError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = CONV_TYPES + (nn.Linear,)

# Tried in turn when the caller gives no input size: CIFAR-sized first, then larger for
# models that need more spatial room (an ImageNet stem on a tiny input, Inception).
DEFAULT_INPUT_SIZES = (32, 64, 224)


class DerivationError(PtdError, ValueError):
    """A student cannot be derived from this teacher; the one-line message says why."""


@dataclass
class Member:
    """A Conv/Linear layer as the width solver sees it."""

    name: str
    kind: str  # "conv", "depthwise" or "linear"
    kernel_area: int
    teacher_in: int
    teacher_out: int
    nnz: int
    weights: int
    group: int = -1
    # (group index, input channels of this layer per channel of that group): where the layer's
    # input channels come from; channels from no group (the image) stay as they are.
    inputs: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Group:
    index: int
    members: list[str]
    teacher_width: int
    fixed: str | None = None  # why the width may not change (e.g. it is the model's output)

    @property
    def label(self) -> str:
        return f"g{self.index}"


@dataclass
class ChannelGraph:
    members: dict[str, Member]  # module order
    groups: list[Group]
    input_size: int
    in_channels: int
    output_layer: str


def _describe(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def layer_out(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, CONV_TYPES) else m.out_features


def layer_in(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, CONV_TYPES) else m.in_features


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def first_conv(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, CONV_TYPES):
            return m
    raise DerivationError(f"cannot derive a student from {_describe(model)}: it has no Conv2d layers")


def example_input(model: nn.Module, size: int) -> torch.Tensor:
    conv = first_conv(model)
    p = next(model.parameters())
    return torch.randn(1, conv.in_channels, size, size, device=p.device, dtype=p.dtype)


def _run(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Forward once (eval, no grad); the names of the Conv/Linear layers in the order they ran."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, LAYER_TYPES)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def find_input_size(model: nn.Module, input_size: int | None) -> tuple[int, list[str]]:
    sizes: Sequence[int] = DEFAULT_INPUT_SIZES if input_size is None else (int(input_size),)
    errors = []
    for s in sizes:
        try:
            return s, _run(model, example_input(model, s))
        except DerivationError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure: try the next size, then report
            errors.append(f"{s}x{s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise DerivationError(
        f"cannot derive a student from {_describe(model)}: its forward pass fails on a single image ({'; '.join(errors)}); pass input_size="
    )


# Extra address space one Torch-Pruning group walk may take before it counts as runaway. A walk
# from one channel (index [0]) legitimately holds a few index lists of at most a feature map's
# area each (kilobytes to megabytes); on some graphs (torchvision's Swin transformers: a flatten
# index mapping inside a cycle) each pass multiplies the list and the walk would take every byte
# of the machine (measured: 24 GiB and an OOM kill for tv:swin_t).
WALK_MEMORY_BUDGET = 1 << 30  # bytes


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def bounded_memory(budget: int = WALK_MEMORY_BUDGET):
    """Let the block grow this process's address space by at most ``budget`` bytes: past that,
    allocations fail (MemoryError) instead of the machine's memory running out. Linux only (a
    no-op elsewhere); the soft limit is restored on exit. Not for blocks that start threads or
    touch CUDA (the limit counts every reservation of the process)."""
    import resource

    now = _address_space()
    if now is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = now + budget
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# A walk from one channel that terminates holds, on each dependency, at most as many indices as
# the tensor it indexes has channels: over the 46 torchvision models ptd derives (tv_zoo, 0.59),
# the longest list was 0.27x the model's widest Conv/Linear layer (squeezenet1_0: 138 of 512;
# MaxViT's wrong but finite coupling reaches 1.5x and is refused after its walk by
# check_group_indices, which names the layer). Where Torch-Pruning's flatten mapping sits in a
# cycle (torchvision's Swin transformers) each pass multiplies the list -- swin_t: 1 -> 32,768 ->
# 1,048,576 indices, 10.7x and 341x its widest layer's 3,072; the smallest first runaway list
# seen, 5.7x (729 of 128, a 3-stage Swin of width 8) -- and the walk ended only at the memory
# bound, after 16 s (tv:swin_t) to 38 s (that small Swin). Past RUNAWAY_FACTOR x the widest layer
# a walk is refused at once.
RUNAWAY_FACTOR = 4


class _RunawayWalk(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class _BoundedMapping:
    """One of Torch-Pruning's index mappings, refusing to hand on a list longer than ``bound``."""

    def __init__(self, mapping, bound: int):
        self.mapping, self.bound = mapping, bound

    def __call__(self, idxs):
        # A forward flatten mapping hands on len(idxs) x its stride indices: refused before it
        # builds them (swin_v2_b's first runaway list, 262,144 indices, took 1-2 s to build). A
        # mapping without these attributes is checked on what it returns.
        if not getattr(self.mapping, "reverse", True) and len(idxs) * getattr(self.mapping, "_stride", 0) > self.bound:
            raise _RunawayWalk(len(idxs) * self.mapping._stride)
        out = self.mapping(idxs)
        if len(out) > self.bound:
            raise _RunawayWalk(len(out))
        return out


def widest_layer(model: nn.Module) -> int:
    """The most channels (or features) any Conv/Linear layer of ``model`` takes or gives."""
    return max((max(layer_in(m), layer_out(m)) for m in model.modules() if isinstance(m, LAYER_TYPES)), default=1)


class _WalkedNodes(dict):
    """A graph's ``module2node`` while :func:`group_walks` reads it: the same entries, looked up as
    before, but iterating its items yields none. Torch-Pruning 1.6.1's ``get_pruning_group(dg,
    ...)`` starts every walk with ``update_index_mapping(dg)``, which iterates
    ``dg.module2node.items()`` to recompute the graph's index mappings (its only iteration of them
    during a walk: the walk itself follows each node's dependencies, the root is found by
    lookup), so on this graph that recomputation finds nothing to do. It lives on the one graph
    object: no library function is replaced, other graphs (other threads, channel surgery) are
    untouched."""

    def items(self):
        return {}.items()


@contextlib.contextmanager
def group_walks(dg, model: nn.Module):
    """Walk the groups of a graph that does not change: with the index mappings Torch-Pruning's
    ``build_dependency`` computed, each bounded to ``RUNAWAY_FACTOR`` x the widest layer.

    ``get_pruning_group`` recomputes every index mapping of the graph before each walk (0.2-0.3 s
    a walk on tv:swin_t: 3.2 of the 3.5 s its 13 walks took before the one that ran away). A walk
    changes none of them, so inside this block that recomputation finds nothing to recompute
    (:class:`_WalkedNodes`), for ``dg`` only. Everything is given back on every exit (an
    exception, KeyboardInterrupt). Not for channel surgery, which changes the graph between walks."""
    bound = RUNAWAY_FACTOR * widest_layer(model)
    wrapped = []
    for node in dg.module2node.values():
        for dep in node.dependencies:
            for i, f in enumerate(dep.index_mapping):
                if f is not None:
                    dep.index_mapping[i] = _BoundedMapping(f, bound)
                    wrapped.append((dep, i, f))
    nodes = dg.module2node
    dg.module2node = _WalkedNodes(nodes)
    try:
        yield
    finally:
        dg.module2node = nodes
        for dep, i, f in wrapped:
            dep.index_mapping[i] = f


def pruning_group(dg, model: nn.Module, name: str, module: nn.Module):
    """Torch-Pruning's coupled group of ``module``'s output channels, walked from channel 0 under
    a memory bound (and, inside :func:`group_walks`, a bound on each index list): a walk that runs
    away is a one-line DerivationError, not an OOM kill."""
    fn = out_channel_fn(dg, module)
    try:
        with bounded_memory():
            return dg.get_pruning_group(module, fn, [0])
    except MemoryError:
        why = f"past {WALK_MEMORY_BUDGET >> 20} MiB"
    except _RunawayWalk as e:
        why = f"channel 0 became {e.size:,} indices, over {RUNAWAY_FACTOR}x the widest layer's {widest_layer(model):,}"
    # Raised here, out of the except blocks, so the failed walk's lists are freed first.
    raise DerivationError(
        f"cannot derive a student from {_describe(model)}: Torch-Pruning's walk of the layers coupled to {name} ran away "
        f"({why}; its index mapping of this graph does not terminate)"
    )


def check_group_indices(dg, model: nn.Module, group, names: dict[int, str], root: str) -> None:
    """Refuse a Torch-Pruning group that indexes channels a layer does not have.

    Through some graphs (torchvision's MaxViT: a qkv projection chunked and reshaped into heads,
    then einsum attention) Torch-Pruning's index mapping is not a channel coupling: channel 0 of a
    192-wide ``to_qkv`` comes back as 3072 indices of that same layer. Surgery on such a group
    cannot give a working model, and each walk costs seconds that grow with the layer's width
    (minutes over MaxViT-T's groups), so the first such group ends the derivation."""
    for dep, idxs in group:
        m = dep.target.module
        if id(m) not in names or not isinstance(m, LAYER_TYPES) or not len(idxs):
            continue
        if dg.is_out_channel_pruning_fn(dep.handler):
            side, have = "output", layer_out(m)
        elif dg.is_in_channel_pruning_fn(dep.handler):
            side, have = "input", layer_in(m)
        else:
            continue
        top = max(int(i) for i in idxs)
        if top >= have:
            raise DerivationError(
                f"cannot derive a student from {_describe(model)}: Torch-Pruning couples channel 0 of {root} to {side} channel {top} of "
                f"{names[id(m)]}, which has {have} (its index mapping through this graph's reshapes is not a channel coupling)"
            )


def build_dependency_graph(model: nn.Module, x: torch.Tensor):
    import torch_pruning as tp

    # Torch-Pruning follows autograd's graph: it needs grad mode on (callers may be under
    # no_grad) and outputs that have a grad_fn even when the model's parameters are frozen.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise DerivationError(
            f"cannot derive a student from {_describe(model)}: Torch-Pruning cannot trace its channel dependencies ({type(e).__name__}: {e})"
        ) from None
    finally:
        for p in frozen:
            p.requires_grad_(False)


def out_channel_fn(dg, module: nn.Module):
    pruner = dg.get_pruner_of_module(module)
    if pruner is None:
        raise DerivationError(f"Torch-Pruning has no pruner for {type(module).__name__}")
    return pruner.prune_out_channels


def check_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Conv/Linear layers by name, or a DerivationError if their types alone rule a
    student out (no conv; a grouped conv that is not depthwise). Reads only the modules' shapes,
    so it also works on a model built on the meta device (no weights, no time)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    if not any(isinstance(m, CONV_TYPES) for m in layers.values()):
        raise DerivationError(f"cannot derive a student from {_describe(model)}: it has no Conv2d layers")
    for n, m in layers.items():
        if isinstance(m, CONV_TYPES) and m.groups > 1 and not is_depthwise(m):
            raise DerivationError(
                f"cannot derive a student from {_describe(model)}: {n} is a grouped conv (groups={m.groups}), which only depthwise convs may be"
            )
    return layers


def extract(model: nn.Module, masks: Masks, input_size: int | None = None) -> tuple[ChannelGraph, object]:
    """The coupled-group graph of ``model`` (and the DependencyGraph it was read from).

    ``nnz`` of a layer is its mask's count, or its nonzero weights where ``masks`` has no entry
    (a layer the pruning left out counts as it is).
    """
    layers = check_layers(model)
    was_training = model.training
    model.eval()
    try:
        size, order = find_input_size(model, input_size)
        if not order:
            raise DerivationError(f"cannot derive a student from {_describe(model)}: none of its Conv/Linear layers runs in forward()")
        dg = build_dependency_graph(model, example_input(model, size))
    finally:
        model.train(was_training)

    members: dict[str, Member] = {}
    for n, m in layers.items():
        if n not in order:
            continue  # defined but unused (e.g. an auxiliary head): not part of the student's graph
        wname = f"{n}.weight" if n else "weight"
        if wname in masks:
            nnz = int(masks[wname].sum())
        else:
            nnz = int((m.weight.detach() != 0).sum())
        if isinstance(m, CONV_TYPES):
            area = 1
            for k in m.kernel_size:
                area *= int(k)
            kind = "depthwise" if is_depthwise(m) else "conv"
        else:
            area, kind = 1, "linear"
        members[n] = Member(n, kind, area, layer_in(m), layer_out(m), nnz, m.weight.numel())

    module_name = {id(m): n for n, m in layers.items()}
    groups: list[Group] = []
    # Torch-Pruning walks the whole graph for each group: seconds on a big model (a Swin-T has
    # ~150 layers); a bar appears after 3 s so a slow derivation is never silent.
    from tqdm.auto import tqdm

    with group_walks(dg, model):  # Torch-Pruning's index mappings computed once, runaway lists refused
        for n in tqdm(members, desc=f"coupled groups of {type(model).__name__}", unit="layer", delay=3, leave=False):
            if members[n].group >= 0:
                continue
            g = pruning_group(dg, model, n, layers[n])
            check_group_indices(dg, model, g, module_name, n)
            gi = len(groups)
            producers: list[str] = []
            consumers: list[tuple[str, int]] = []
            for dep, idxs in g:
                tgt = dep.target.module
                tn = module_name.get(id(tgt))
                if tn is None or tn not in members:
                    continue
                if dg.is_out_channel_pruning_fn(dep.handler):
                    if tn not in producers:
                        producers.append(tn)
                elif dg.is_in_channel_pruning_fn(dep.handler):
                    consumers.append((tn, len(idxs)))
            for p in producers:
                if members[p].group >= 0 and members[p].group != gi:
                    raise DerivationError(f"cannot derive a student from {_describe(model)}: layer {p} sits in two coupled groups")
                members[p].group = gi
            for c, mult in consumers:
                if members[c].kind != "depthwise":
                    members[c].inputs.append((gi, mult))
            widths = {members[p].teacher_out for p in producers}
            if len(widths) != 1:
                raise DerivationError(f"cannot derive a student from {_describe(model)}: coupled layers {producers} disagree on their width")
            ordered = [p for p in members if p in producers]
            groups.append(Group(gi, ordered, widths.pop()))

    output_layer = order[-1]
    groups[members[output_layer].group].fixed = "model output: keeps its width"
    graph = ChannelGraph(members, groups, size, first_conv(model).in_channels, output_layer)
    return graph, dg


def pin_layer(graph: ChannelGraph, layer: str, reason: str, readers: Sequence[str]) -> None:
    """Give ``layer`` its own group at its teacher's width, cut from the group it shares.

    For a family whose rebuild adds a 1x1 projection wherever widths differ (the paper's ResNet
    students keep the stem at its width and give stage 1 a projection): ``readers`` are the
    layers that read ``layer``'s output directly (not through a residual add); they read the
    pinned group from now on, every other consumer keeps reading the group ``layer`` left.
    """
    m = graph.members[layer]
    old = graph.groups[m.group]
    if len(old.members) == 1:
        old.fixed = reason
        return
    new = Group(len(graph.groups), [layer], m.teacher_out, fixed=reason)
    graph.groups.append(new)
    old.members.remove(layer)
    m.group = new.index
    for r in readers:
        if r in graph.members:
            rm = graph.members[r]
            rm.inputs = [(new.index if g == old.index else g, mult) for g, mult in rm.inputs]
